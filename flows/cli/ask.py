"""``atr ask``: the model's greedy answer to a question about one image."""

from __future__ import annotations

from pipeline.errors import UserError

from .common import MODEL_HELP, add_command, add_compute_options, preflight


def ask_parser(sub, common) -> None:
    p = add_command(
        sub, common, "ask",
        help="answer a question about an image",
        description="Load the model (prepared and cached like prepare-model) and print its greedy "
                    "answer, through the processor's chat template and HF generate.",
        epilog='example:\n  atr ask --image card.png --question "What is written in the image?"')
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--image", required=True, help="image file (.png, .jpg, .webp)")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default: 16)")
    add_compute_options(p)


def cmd_ask(home, args) -> int:
    from pipeline.device import compute
    from pipeline.images import decode_image
    from pipeline.loading import cached_model
    from pipeline.tinyworld import ask

    from ..stages.prepare_model import prepare_model

    preflight(args.model)
    compute(args.device, args.dtype)  # a device or dtype this machine lacks: one line before any work
    image = decode_image(args.image)  # BadImage: one line naming the file
    if not args.question.strip():
        raise UserError("--question is empty")
    # A plain stage call, not a Prefect flow: asking is not a pipeline run, and it
    # saves starting Prefect's temporary server. The model stage is still cached.
    result = prepare_model(home, args.model)
    model, processor = cached_model(str(result.model_dir), *compute(args.device, args.dtype))
    print(ask(model, processor, [image], [args.question], max_new_tokens=args.max_new_tokens)[0])
    return 0
