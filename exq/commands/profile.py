"""`exq profile`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from exq.commands.common import positive_int


def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "profile",
        help="record how the router uses each expert on calibration text",
        description="Run calibration text through an MoE model and record, per MoE layer, the router's own choices: "
        "per-expert token counts and gate mass, routing entropies, and co-activation between consecutive MoE layers, "
        "in total and per corpus file.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder (or Hugging Face id) of a supported MoE model")
    p.add_argument(
        "--corpus", required=True, nargs="+", metavar="FILE", help="text files (.txt or .txt.gz), one domain each"
    )
    p.add_argument("--tokens", required=True, type=positive_int, help="total tokens, split evenly over the files")
    p.add_argument(
        "--seq-len", type=positive_int, help="tokens per sequence (default 512, or the model's context if shorter)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="compute dtype (default: the checkpoint's)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--output", required=True, help="profile path, NAME.json (arrays go to NAME.npz)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG picture of the profile (NAME.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    def run(a: argparse.Namespace) -> int:
        from exq.profiling import profile

        prof = profile(
            a.model,
            a.corpus,
            a.tokens,
            seq_len=a.seq_len,
            batch_size=a.batch_size,
            dtype=a.dtype,
            device=a.device,
            progress=not a.quiet,
        )
        path = prof.save(a.output)
        written = [path, path.with_suffix(".npz")]
        if not a.no_plot:
            from exq.profiling.plot import plot_profile

            written.append(plot_profile(prof, path.with_suffix(".png")))
        if not a.quiet:
            print(profile_table(prof))
            print("wrote " + ", ".join(map(str, written)))
        return 0

    return run


def profile_table(prof) -> str:
    lines = [
        f"{prof.model['architecture']}: {prof.tokens} tokens over {len(prof.domains)} domain(s) "
        f"({', '.join(prof.domain_names)}), seq_len {prof.seq_len}",
        f"{'layer':>5} {'experts':>7} {'top-k':>5} {'H(share)/lnE':>12} {'H(token)':>9} {'max/uniform':>11} "
        f"{'unused':>6}",
    ]
    for s in prof.summary():
        lines.append(
            f"{s['layer_index']:>5} {s['num_experts']:>7} {s['top_k']:>5} {s['marginal_entropy_normalised']:>12.3f} "
            f"{s['mean_token_entropy']:>9.3f} {s['max_over_uniform_share']:>11.2f} {s['unused_experts']:>6}"
        )
    return "\n".join(lines)
