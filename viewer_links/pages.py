"""The pages a person sees when a link cannot be opened, in French, German or English.

The language follows ``Accept-Language`` (RFC 9110 §12.5.4, quality values honoured); French,
the DSP portal's first language, when none of the three is asked for.
"""

from __future__ import annotations

import html

LANGUAGES = ("fr", "de", "en")
DEFAULT_LANGUAGE = "fr"

TITLES = {
    "fr": "Impossible d'ouvrir l'examen",
    "de": "Die Untersuchung kann nicht geöffnet werden",
    "en": "The exam cannot be opened",
}

MESSAGES: dict[str, dict[str, str]] = {
    "malformed": {
        "fr": "Ce lien est incomplet ou endommagé. Copiez-le en entier ou rouvrez l'examen "
              "depuis votre Dossier de Soins Partagé (DSP).",
        "de": "Dieser Link ist unvollständig oder beschädigt. Kopieren Sie ihn vollständig oder "
              "öffnen Sie die Untersuchung erneut aus Ihrer Gesundheitsakte (DSP).",
        "en": "This link is incomplete or damaged. Copy it whole, or open the exam again from "
              "the shared care record (DSP).",
    },
    "unknown_kid": {
        "fr": "Ce lien a été signé avec une clé que ce service ne connaît pas.",
        "de": "Dieser Link wurde mit einem Schlüssel signiert, den dieser Dienst nicht kennt.",
        "en": "This link was signed with a key this service does not know.",
    },
    "bad_signature": {
        "fr": "Ce lien n'est pas valide : sa signature ne correspond pas. Il a peut-être été "
              "modifié.",
        "de": "Dieser Link ist ungültig: Seine Signatur stimmt nicht. Er wurde möglicherweise "
              "verändert.",
        "en": "This link is not valid: its signature does not match. It may have been altered.",
    },
    "wrong_audience": {
        "fr": "Ce lien a été émis pour un autre service.",
        "de": "Dieser Link wurde für einen anderen Dienst ausgestellt.",
        "en": "This link was issued for another service.",
    },
    "expired": {
        "fr": "Ce lien a expiré. Rouvrez l'examen depuis votre Dossier de Soins Partagé (DSP) "
              "avec le bouton « Voir l'examen ».",
        "de": "Dieser Link ist abgelaufen. Öffnen Sie die Untersuchung erneut aus Ihrer "
              "Gesundheitsakte (DSP) mit der Schaltfläche „Voir l'examen“.",
        "en": "This link has expired. Open the exam again from the shared care record (DSP) "
              "with the \"Voir l'examen\" button.",
    },
    "not_yet_valid": {
        "fr": "Ce lien n'est pas encore valide. Vérifiez l'heure de votre appareil.",
        "de": "Dieser Link ist noch nicht gültig. Prüfen Sie die Uhrzeit Ihres Geräts.",
        "en": "This link is not valid yet. Check your device's clock.",
    },
    "revoked": {
        "fr": "Ce lien a été révoqué.",
        "de": "Dieser Link wurde widerrufen.",
        "en": "This link has been revoked.",
    },
    "used_up": {
        "fr": "Ce lien a déjà été utilisé autant de fois que permis.",
        "de": "Dieser Link wurde bereits so oft wie erlaubt verwendet.",
        "en": "This link has already been used as many times as allowed.",
    },
    "policy": {
        "fr": "Vous n'avez pas accès à cet examen selon les règles de confidentialité du DSP.",
        "de": "Nach den Vertraulichkeitsregeln des DSP haben Sie keinen Zugang zu dieser "
              "Untersuchung.",
        "en": "The DSP's confidentiality rules do not give you access to this exam.",
    },
    "not_found": {
        "fr": "Cet examen n'est pas disponible.",
        "de": "Diese Untersuchung ist nicht verfügbar.",
        "en": "This exam is not available.",
    },
    "too_many": {
        "fr": "Trop de liens invalides ont été reçus depuis cette adresse. Réessayez dans "
              "quelques minutes.",
        "de": "Von dieser Adresse kamen zu viele ungültige Links. Versuchen Sie es in einigen "
              "Minuten erneut.",
        "en": "Too many invalid links came from this address. Try again in a few minutes.",
    },
    "no_viewer": {
        "fr": "La visionneuse n'est pas installée sur ce serveur. L'administrateur l'installe "
              "avec la commande : dicom-gateway viewer install",
        "de": "Der Viewer ist auf diesem Server nicht installiert. Der Administrator installiert "
              "ihn mit dem Befehl: dicom-gateway viewer install",
        "en": "The viewer is not installed on this server. The administrator installs it with "
              "the command: dicom-gateway viewer install",
    },
}

CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'"


def negotiate_language(accept_language: str | None) -> str:
    """Pick fr, de or en from an ``Accept-Language`` header.

    >>> negotiate_language("en-GB,en;q=0.8,de;q=0.9")
    'en'
    >>> negotiate_language("de-LU;q=0.5, fr;q=0.4")
    'de'
    >>> negotiate_language("pt-PT")
    'fr'
    """
    best, best_q = DEFAULT_LANGUAGE, 0.0
    for position, part in enumerate((accept_language or "").split(",")):
        pieces = part.strip().split(";")
        tag = pieces[0].strip().lower().split("-")[0]
        q = 1.0
        for param in pieces[1:]:
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        q -= position * 1e-6  # equal weights: the first listed wins
        if tag in LANGUAGES and q > best_q:
            best, best_q = tag, q
    return best


def refusal_page(reason: str, accept_language: str | None) -> tuple[str, str]:
    """Return ``(language, html)`` of the page explaining ``reason``."""
    language = negotiate_language(accept_language)
    message = MESSAGES.get(reason, MESSAGES["malformed"])[language]
    page = f"""<!DOCTYPE html>
<html lang="{language}">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{html.escape(TITLES[language])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;
color:#1d2a3a}}h1{{font-size:1.4rem}}code{{color:#6b7785}}</style></head>
<body><main><h1>{html.escape(TITLES[language])}</h1>
<p id="message">{html.escape(message)}</p>
<p><code id="reason">{html.escape(reason)}</code></p></main></body>
</html>
"""
    return language, page
