"""``dicom-gateway links mint|revoke|list`` and ``dicom-gateway viewer install``.

:func:`add_parsers` is called by the command line's composition root (``gateway/cli.py``).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import Settings, load_settings
from gateway.core import Gateway
from viewer_links import build_service
from viewer_links.service import MintRequest
from viewer_links.settings import link_settings
from viewer_links.viewer import ViewerInstallError, install, installed_version

CLI_ACTOR = "cli"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def base_url(settings: Settings) -> str:
    """Where links point when minted outside a request: ``[http] base_url`` or the listener."""
    if settings.http.base_url:
        return settings.http.base_url.rstrip("/")
    host = settings.http.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.http.port}"


def cmd_links_mint(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with Gateway(settings) as gateway:
        minted = build_service(gateway).mint(
            MintRequest(study=args.study, viewer_id=args.viewer_id,
                        viewer_name=args.viewer_name or "", relationship=args.relationship,
                        ttl=args.ttl, key_images_only=args.key_images_only,
                        max_uses=args.max_uses),
            by=CLI_ACTOR, base_url=base_url(settings))
    print(minted.url)
    print(f"jti {minted.jti}, expires {minted.expires_at.isoformat()}", file=sys.stderr)
    return 0


def cmd_links_revoke(args: argparse.Namespace) -> int:
    with Gateway(_settings(args)) as gateway:
        registered = build_service(gateway).revoke(args.jti, by=CLI_ACTOR)
    print(f"link {args.jti} revoked" + ("" if registered else
                                        " (not opened yet: refused if it ever comes)"))
    return 0


def cmd_links_list(args: argparse.Namespace) -> int:
    with Gateway(_settings(args)) as gateway:
        links = build_service(gateway).list_links(study=args.study, active=args.active)
    now = datetime.now(UTC)
    print(f"{'jti':32}  {'study':44}  {'relationship':20}  uses   state    expires")
    for link in links:
        expires = link.expires_at if link.expires_at.tzinfo else link.expires_at.replace(
            tzinfo=UTC)
        state = "revoked" if link.revoked_at else ("expired" if expires <= now else "active")
        uses = f"{link.uses}/{link.max_uses}" if link.max_uses else str(link.uses)
        print(f"{link.jti:32}  {link.study_instance_uid:44}  {link.viewer_relationship:20}  "
              f"{uses:5}  {state:7}  {expires.isoformat(timespec='seconds')}")
    return 0


def cmd_viewer_install(args: argparse.Namespace) -> int:
    settings = _settings(args)
    links, _ = link_settings(settings)
    folder = Path(args.dest) if args.dest else links.viewer_dir
    version = args.version or links.ohif_version
    if args.if_missing and installed_version(folder):
        print(f"OHIF {installed_version(folder)} is installed in {folder}")
        return 0
    try:
        changed = install(folder, version, force=args.force)
    except ViewerInstallError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return 1
    print(f"OHIF {version} {'installed' if changed else 'already installed'} in {folder}")
    return 0


def demo_link(gateway: Gateway, study_uid: str, patient_id: str) -> str:
    """For ``dicom-gateway demo``: record the sample patient's DSP and mint a link for them."""
    service = build_service(gateway)
    if not service.registry.dsp_created(patient_id):
        service.set_dsp_created(patient_id, "2020-01-01", by="demo")
    minted = service.mint(
        MintRequest(study=study_uid, viewer_id=patient_id, viewer_name="sample patient",
                    relationship="patient", ttl=service.settings.max_ttl),
        by="demo", base_url=base_url(gateway.settings))
    return minted.url


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``links`` and ``viewer`` commands."""
    links = sub.add_parser("links", help="viewer links: mint, revoke, list")
    actions = links.add_subparsers(dest="links_command", required=True, metavar="ACTION")
    mint = actions.add_parser("mint", help="mint a viewer link and print its URL")
    mint.add_argument("--study", required=True, help="Study Instance UID")
    mint.add_argument("--viewer-id", required=True, help="the viewer's identifier")
    mint.add_argument("--viewer-name", help="the viewer's display name")
    mint.add_argument("--relationship", required=True,
                      help="patient, legal_representative, dsp_assistant, referring_physician, "
                           "trust_circle, presence_code, care_stay or author")
    mint.add_argument("--ttl", type=int, help="lifetime in seconds (default [links] default_ttl)")
    mint.add_argument("--key-images-only", action="store_true",
                      help="open on the study's key images only")
    mint.add_argument("--max-uses", type=int, help="how many times it may be opened")
    mint.set_defaults(func=cmd_links_mint)
    revoke = actions.add_parser("revoke", help="revoke a link by its jti")
    revoke.add_argument("jti")
    revoke.set_defaults(func=cmd_links_revoke)
    listing = actions.add_parser("list", help="list the registered links")
    listing.add_argument("--study", help="only this study's links")
    listing.add_argument("--active", action="store_true", help="only unrevoked, unexpired links")
    listing.set_defaults(func=cmd_links_list)

    viewer = sub.add_parser("viewer", help="the OHIF web viewer")
    viewer_actions = viewer.add_subparsers(dest="viewer_command", required=True,
                                           metavar="ACTION")
    setup = viewer_actions.add_parser(
        "install", help="fetch the pinned @ohif/app with npm pack and unpack its dist/")
    setup.add_argument("--dest", help="folder (default: [links] viewer_dir, data/viewer)")
    setup.add_argument("--version", help="@ohif/app version (default: [links] ohif_version)")
    setup.add_argument("--force", action="store_true", help="reinstall even if present")
    setup.add_argument("--if-missing", action="store_true",
                       help="do nothing when any version is installed")
    setup.set_defaults(func=cmd_viewer_install)


__all__ = ["add_parsers", "base_url", "demo_link"]
