"""``difflab sample``: a PNG grid (and optionally one PNG per image) from a run or a Stable
Diffusion model through ``difflab.Pipeline``: text/class conditioning, image-to-image,
inpainting, adapters, and ``--from-png`` to repeat the generation a PNG records.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from .common import (
    UserError,
    _add_adapter_args,
    _add_device_args,
    _add_model_args,
    _load_pipeline,
    add_refinement_args,
    refinement_options,
)


def add_sample_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample",
        help="draw images from a trained run into a PNG grid",
        description="Sample a run directory. The PNG's 'difflab' text chunk holds every "
        "generation parameter as JSON.",
    )
    p.add_argument(
        "run",
        nargs="?",
        default=None,
        help="a run directory, a diffusers Stable Diffusion folder or an SD .safetensors file; "
        "with --from-png, default: the run the PNG's difflab parameters name",
    )
    p.add_argument(
        "--from-png",
        default=None,
        metavar="PNG",
        help="re-create an image from its parameters (difflab's or AUTOMATIC1111's text "
        "chunk); the other flags given override them",
    )
    p.add_argument("--weights", default="ema", help="runs: ema, raw or a weights file")
    _add_model_args(p)
    p.add_argument("--sampler", default=None, help="sampler name or alias")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--spacing", default=None, help="timestep spacing (default: the sampler's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    add_refinement_args(p)
    p.add_argument(
        "--init-image",
        default=None,
        metavar="PNG",
        help="image-to-image (SDEdit): start from this image (resized and centre-cropped to "
        "the run's size); each of the --n images is a variation from its own seed",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --init-image: the fraction of the steps run, in (0, 1] (1 = from pure noise)",
    )
    p.add_argument(
        "--mask",
        default=None,
        metavar="PNG",
        help="with --init-image: inpaint; white = generate, black = keep (grey blends)",
    )
    p.add_argument(
        "--class",
        dest="classes",
        type=int,
        nargs="+",
        default=None,
        help="class label(s): one for all images, or K labels each repeated n/K times",
    )
    p.add_argument("--prompt", default=None)
    p.add_argument(
        "--no-clip", action="store_true", help="do not clip each x0 prediction to [-1, 1]"
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--n", type=int, default=None, help="number of images (default 16)")
    p.add_argument(
        "--vae-tiling", action="store_true",
        help="latent models: decode in overlapping tiles (large images in less memory)",
    )  # fmt: skip
    p.add_argument(
        "--vae-slicing", action="store_true", help="latent models: decode one image at a time"
    )
    p.add_argument(
        "--clip-skip", type=int, default=None, metavar="N",
        help="SD models: A1111's Clip skip (1 = the text encoder's last layer, 2 = the one "
        "before it)",
    )  # fmt: skip
    for side in ("height", "width"):
        p.add_argument(
            f"--{side}", type=int, default=None, metavar="PX",
            help=f"image {side} in pixels (default: the model's own)",
        )  # fmt: skip
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("-o", "--out", default=None, help="output PNG (default RUN/samples/...)")
    p.add_argument("--separate", action="store_true", help="also write one PNG per image")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the network first (Pipeline.compile)"
    )
    _add_device_args(p)
    _add_adapter_args(p)
    _defer_defaults(p)
    p.set_defaults(func=_sample)


def _expand_classes(classes: list[int] | None, n: int | None) -> tuple[list[int] | None, int]:
    if classes is None:
        return None, n if n is not None else 16
    k = len(classes)
    if n is None:
        n = k if k > 1 else 16
    if k == 1:
        return classes * n, n
    if n % k:
        raise UserError(f"--n {n} is not a multiple of the {k} labels given with --class")
    return [c for c in classes for _ in range(n // k)], n


def _read_image(path: str, shape: tuple[int, int, int], flag: str) -> Any:
    """The image at ``path`` as ``[1, C, H, W]`` in [-1, 1] at the run's pixel ``shape``:
    converted to its channels, shorter side resized, centre cropped (as training data)."""
    from PIL import Image, UnidentifiedImageError

    from ..data.transforms import ImageTransform

    c, h, w = shape
    if h != w:
        raise UserError(f"{flag} needs a square model, this run makes {h}x{w} images")
    try:
        with Image.open(path) as img:
            return ImageTransform(h, c)(img)[None]
    except FileNotFoundError:
        raise UserError(f"{flag} {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{flag} {path!r} is not a readable image: {err}") from None


def _sample(args: argparse.Namespace) -> int:
    from ..images import save_grid, save_image

    _from_png(args)
    labels, n = _expand_classes(args.classes, args.n)
    pipe = _load_pipeline(args)
    if args.compile:
        pipe.compile()
    kwargs = dict(
        class_labels=labels,
        prompt=args.prompt,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.cfg,
        seed=args.seed,
        spacing=args.spacing,
        clip_x0=False if args.no_clip else None,  # None: clip pixels, not latents
        **({"clip_skip": args.clip_skip} if args.clip_skip is not None else {}),
        **refinement_options(args),
    )
    if args.vae_tiling or args.vae_slicing:
        if pipe.vae is None:
            raise UserError("--vae-tiling / --vae-slicing need a latent model (an autoencoder)")
        pipe.vae.enable_tiling(args.vae_tiling)
        pipe.vae.enable_slicing(args.vae_slicing)
    if (args.init_image is None) != (args.strength is None):
        raise UserError("image-to-image needs both --init-image and --strength")
    if args.mask is not None and args.init_image is None:
        raise UserError("--mask (inpainting) needs --init-image and --strength")
    if args.init_image is None:
        size = None if args.height is None and args.width is None else (args.height, args.width)
        params = pipe.resolve_params(n, size=size, **kwargs)
        images = pipe(n, progress=None, height=args.height, width=args.width, **kwargs)
    else:
        init = _read_image(args.init_image, pipe.pixel_shape, "--init-image")
        mask = None
        if args.mask is not None:  # white = generate: [-1, 1] grey levels to [0, 1]
            _, h, w = pipe.pixel_shape
            mask = (_read_image(args.mask, (1, h, w), "--mask") + 1) / 2
        params = pipe.resolve_params(n, strength=args.strength, inpaint=mask is not None, **kwargs)
        result = pipe.img2img(
            init.expand(n, -1, -1, -1), args.strength, progress=None, mask=mask, **kwargs
        )
        images = result.images
        params.update(init_image=str(args.init_image), timesteps=result.timesteps)
        if args.mask is not None:
            params["mask"] = str(args.mask)
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"sample_seed{args.seed}.png"
    nrow = args.nrow
    if nrow is None and args.classes and len(args.classes) > 1:
        nrow = n // len(args.classes)  # one row per class
    save_grid(images, out, nrow=nrow, params=params)
    steps = f"{params['steps']} steps"
    if args.init_image is not None:  # the steps actually run, and what they started from
        what = "inpainting" if args.mask is not None else "from"
        steps = f"{len(params['timesteps'])} of {steps} {what} {args.init_image}"
    print(f"wrote {out} ({n} images, {params['sampler']}, {steps})")
    if args.separate:
        folder = out.with_suffix("")
        for i in range(n):
            one = dict(params, n=1, seed=args.seed + i, index=i)
            one["class_labels"] = None if labels is None else [labels[i]]
            save_image(images[i], folder / f"{i:04d}.png", one)
        print(f"wrote {n} separate images to {folder}/")
    return 0


# `difflab sample --from-png`: the flags it may fill -> the PNG parameter each takes.
_PNG_FLAGS = {
    "weights": "weights", "sampler": "sampler", "steps": "steps", "spacing": "spacing",
    "cfg": "guidance_scale", "cfg_rescale": "guidance_rescale",
    "cfg_interval": "guidance_interval", "eta": "eta", "seed": "seed", "n": "n",
    "classes": "class_labels", "prompt": "prompt", "negative_prompt": "negative_prompt",
    "negative_class": "negative_class", "dtype": "dtype", "init_image": "init_image",
    "mask": "mask", "height": "height", "width": "width", "clip_skip": "clip_skip",
}  # fmt: skip


# Sample flags whose default is not None: None until parsed, so a flag left out is told from
# one given with its default value; ``_from_png`` puts the defaults back.
_DEFERRED = ("weights", "cfg_rescale", "seed", "dtype", "lora_scale")


def _defer_defaults(p: argparse.ArgumentParser) -> None:
    p.set_defaults(
        _deferred={dest: p.get_default(dest) for dest in _DEFERRED}, **dict.fromkeys(_DEFERRED)
    )


def _from_png(args: argparse.Namespace) -> None:
    """Fill the sample flags not given from ``--from-png``'s parameters, then the defaults."""
    if args.from_png is not None:
        from ..images import read_png_parameters

        params = read_png_parameters(args.from_png)
        if args.run is None:
            args.run = params.get("run")
            if args.run is None:
                model = f" (A1111 'Model: {params['model']}')" if params.get("model") else ""
                raise UserError(
                    f"--from-png {args.from_png}: its parameters name no difflab run{model}; "
                    "give the run directory as the first argument"
                )
        _fill_from_params(args, params, sd_model=_is_sd_model(args.run))
    for dest, default in args._deferred.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.run is None:
        raise UserError("sample needs a run directory (or --from-png PNG naming one)")


def _is_sd_model(path: str) -> bool:
    """Whether ``path`` is a Stable Diffusion model (not a difflab run)."""
    from ..interop.sd import path_kind

    try:
        return path_kind(path) != "run"
    except (OSError, ValueError):
        return False  # the loader names what is wrong with it


def _fill_from_params(
    args: argparse.Namespace, params: dict[str, Any], *, sd_model: bool = False
) -> None:
    """``args``' flags left out <- ``params`` (difflab's names; see ``_PNG_FLAGS``); A1111's
    Clip skip applies to SD models only (a difflab run has no CLIP layers to skip)."""
    skip = params.get("clip_skip")
    if skip is not None and not sd_model:
        params = {k: v for k, v in params.items() if k != "clip_skip"}
    if params.get("size") and "height" not in params:  # difflab's [height, width]
        params = {**params, "height": params["size"][0], "width": params["size"][1]}
    if isinstance(params.get("negative_class"), list):  # one per image; the flag takes one
        classes = set(params["negative_class"])
        params = {**params, "negative_class": classes.pop() if len(classes) == 1 else None}
    given = {dest for dest in _PNG_FLAGS if getattr(args, dest, None) is not None}
    if "sampler" in given:  # another sampler: its own default spacing unless --spacing
        given.add("spacing")
    for dest, key in _PNG_FLAGS.items():
        value = params.get(key)
        if dest in given or value is None or value == "":
            continue
        if not hasattr(args, dest):  # a parameter this command has no flag for
            warnings.warn(f"--from-png: {key} {value!r} is not applied", stacklevel=2)
            continue
        setattr(args, dest, value)
    if args.init_image is not None and args.strength is None:
        args.strength = params.get("strength")
    if params.get("clip_x0") is False:
        args.no_clip = True
    apg = params.get("apg")
    if apg and not args.apg and (args.apg_eta, args.apg_momentum, args.apg_threshold) == (
        None, None, None,
    ):  # fmt: skip
        args.apg = True
        args.apg_eta, args.apg_momentum = apg.get("eta"), apg.get("momentum")
        args.apg_threshold = apg.get("norm_threshold")
    loras = params.get("lora") or []
    if loras and not args.lora:  # each file at its own strength, unless --lora-scale says
        args.lora = [
            lora["path"] if args.lora_scale is not None else f"{lora['path']}:{lora['scale']}"
            for lora in loras
        ]
    if params.get("embeddings") and not args.embedding:
        args.embedding = [item["path"] for item in params["embeddings"]]
    if args.nrow is None and "n" not in given:
        args.nrow = _grid_columns(args.from_png, int(params.get("n") or 1))
    unused = [f"sampler options {params['sampler_options']}"] if "sampler_options" in params else []
    if skip not in (None, 1) and not sd_model:
        unused.append(f"Clip skip {skip}")
    unused += [key for key in params.get("extra", {}) if key != "Version"]
    if unused:
        warnings.warn(f"--from-png: not applied: {', '.join(unused)}", stacklevel=2)


def _grid_columns(path: str, n: int) -> int | None:
    """The columns of the grid of ``n`` square images in ``path`` (1-pixel padding), if any."""
    from PIL import Image

    if n < 2:
        return None
    with Image.open(path) as img:
        width, height = img.size
    for ncol in range(1, n + 1):
        rows = -(-n // ncol)
        tile, rem = divmod(width - 1, ncol)
        if not rem and (height - 1) % rows == 0 and (height - 1) // rows == tile:
            return ncol
    return None
