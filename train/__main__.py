"""`python -m specdistill.train ...` is `specdistill train ...` (also under torchrun or accelerate launch)."""

from specdistill.distill.hydra_errors import quiet_deepspeed_on_cpu, run_hydra_app

quiet_deepspeed_on_cpu()  # before DeepSpeed can be imported

from specdistill.train.train import main  # noqa: E402

run_hydra_app(main)
