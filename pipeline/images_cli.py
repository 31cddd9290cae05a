"""`python -m pipeline images build|push|lock [NAME...]`: what the CLI does with pipeline.images.

The repositories come from `images.refs` (of `-c CONFIG`, or the built-in defaults): an image
`cpu` with ref `faster-qat-cpu:dev` is built and pushed as `faster-qat-cpu:dev`, and locked
as `faster-qat-cpu:dev@sha256:...` in the lock file the config names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import ImagesConfig
from pipeline.errors import ConfigError
from pipeline.image_lock import resolve_lock_path
from pipeline.images import (
    build_image,
    docker_client,
    lock_entry,
    push_image,
    select,
    update_lock,
)


def _images_config(args: argparse.Namespace) -> ImagesConfig:
    if args.config is None:
        if args.overrides:
            raise ConfigError("images: --set needs -c CONFIG")
        return ImagesConfig()
    from pipeline.loader import load_config

    return load_config(args.config, args.overrides).config.images


def _build_args(items: list[str], base: str | None) -> dict[str, str]:
    build_args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--build-arg {item}: expected KEY=VALUE")
        build_args[key] = value
    if base:
        build_args["BASE"] = base
    return build_args


def _echo(line: str) -> None:
    print(line, flush=True)


def run_images_command(args: argparse.Namespace) -> int:
    images = _images_config(args)
    selected = select(args.names, images.refs)
    client = docker_client()
    if args.images_command == "build":
        build_args = _build_args(args.build_arg, args.base)
        for name, ref in selected.items():
            build_image(client, name, ref, _echo, build_args, args.network, args.no_cache)
        print("next: `python -m pipeline images lock` pins them (after `images push` for clusters)")
    elif args.images_command == "push":
        for name, ref in selected.items():
            push_image(client, name, ref, _echo)
        print("next: `python -m pipeline images lock` pins the registry digests")
    else:
        path = _lock_path(args.lock_file, images)
        entries = {name: lock_entry(client, name, ref) for name, ref in selected.items()}
        update_lock(path, entries)
        for name, entry in entries.items():
            print(f"{name}: {entry.ref} ({entry.pinned_by})")
        print(f"locked in {path}")
    return 0


def _lock_path(option: Path | None, images: ImagesConfig) -> Path:
    if option is not None:
        return option.resolve()
    if images.lock_file is None:
        raise ConfigError("images lock: images.lock_file is null; pass --lock-file PATH")
    return resolve_lock_path(images.lock_file)
