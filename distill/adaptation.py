"""Online drafter adaptation (OnlineSpec, arXiv 2603.12617; OSD, Liu et al. 2023): while decoding a stream of prompts,
train the drafter on what verification already computed.

After each decoded turn the drafter takes `steps` AdamW steps of its own training loss (the objective it was trained
with, read from its resolved_config.yaml, else its kind's default) on that turn's sequence: the target's features and
logits along prompt + output, gathered from the prefill and the verification forwards (Decoder(record_target=True)),
so adapting costs no extra target pass. The loss covers the output positions, whose labels are the target's own
distributions there. Decoding stays lossless whatever the drafter's weights: verification decides every token, and the
drafter changes only between turns, never inside one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from specdistill.distill.decoding import Generation
from specdistill.distill.drafters.registry import (kind_of_folder, read_drafter_config, registered_kinds,
                                                   resolve_objective)
from specdistill.distill.errors import UserError
from specdistill.distill.outputs import json_text, replace_folder
from specdistill.distill.target import FrozenTarget, TargetOutput


def trained_objective(kind: Any, drafter_path: Path) -> Any:
    """The objective the drafter at `drafter_path` was trained with: its kind's default objective, with the values its
    resolved_config.yaml records (when the folder has one) for the fields that objective has."""
    objective = resolve_objective(kind, None)
    resolved = drafter_path / "resolved_config.yaml"
    if resolved.is_file():
        recorded = OmegaConf.to_container(OmegaConf.load(resolved).get("objective") or {}, resolve=True)
        names = {field.name for field in dataclasses.fields(objective)}
        objective = dataclasses.replace(objective, **{key: value for key, value in recorded.items() if key in names})
    return objective


class OnlineAdapter:
    """A drafter that keeps training on the turns decoded with it (module doc): `update` after each turn, `drafting`
    for the decoder, `save` for a drafter folder like any other."""

    def __init__(self, drafter_path: str, target: FrozenTarget, device: torch.device, lr: float, steps: int = 1,
                 grad_clip_norm: float = 1.0):
        path = Path(drafter_path).expanduser()
        kind = kind_of_folder(read_drafter_config(path), path)
        if not hasattr(kind.model_class, "load_for_target"):
            adaptable = sorted(k.name for k in registered_kinds() if hasattr(k.model_class, "load_for_target"))
            raise UserError(f"eval.adaptation=online trains a drafter that reads the target's features "
                            f"({'|'.join(adaptable)}); {path} is a {kind.name} drafter: set eval.adaptation=none")
        self.drafter_path, self.kind, self.device = path, kind, device
        self.drafter = kind.model_class.load_for_target(path, target, device)
        self.objective = trained_objective(kind, path)
        self.parameters = [p for p in self.drafter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.0)
        self.lr, self.steps, self.grad_clip_norm = lr, steps, grad_clip_norm
        self.updates, self.tokens_seen, self.losses, self.update_seconds = 0, 0, [], 0.0

    def drafting(self) -> Any:
        """The decoding interface over the current weights (built afresh: a head may keep derived copies of them)."""
        return self.drafter.eval().drafting(self.device)

    def update(self, prompt_ids: list[int], generation: Generation) -> float:
        """`steps` optimizer steps on one decoded turn → the mean loss per trained position of the first."""
        started = time.perf_counter()
        recorded = generation.target_output
        if recorded is None:
            raise RuntimeError("decode with Decoder(record_target=True) to adapt")
        sequence = prompt_ids + generation.output_ids
        input_ids = torch.tensor([sequence], device=self.device)
        attention_mask = torch.ones_like(input_ids)
        loss_mask = torch.zeros_like(input_ids)
        loss_mask[:, len(prompt_ids):] = 1
        # clones: decoding ran under inference mode, whose tensors autograd cannot save
        target = TargetOutput(recorded.logits.clone(),
                              {layer_id: feature.clone() for layer_id, feature in recorded.features.items()}, None)
        trained = self.drafter.trained_rows(loss_mask).sum().clamp(min=1)
        first_loss = None
        self.drafter.train()
        for _ in range(self.steps):
            with torch.enable_grad():
                loss = self.drafter.training_loss(input_ids, attention_mask, loss_mask, target, self.objective)
                (loss.loss_sum / trained).backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            first_loss = float(loss.loss_sum.detach() / trained) if first_loss is None else first_loss
        self.drafter.eval()
        self.updates += 1
        self.tokens_seen += len(generation.output_ids)
        self.losses.append(first_loss)
        self.update_seconds += time.perf_counter() - started
        return first_loss

    def provenance(self, bench: str, prompts: list[str]) -> dict:
        """Where the adapted weights came from (adaptation.json beside them)."""
        return {"adapted_from": str(self.drafter_path), "method": "online (OnlineSpec / OSD)", "kind": self.kind.name,
                "objective": type(self.objective).__name__, "lr": self.lr, "steps_per_update": self.steps,
                "updates": self.updates, "tokens_seen": self.tokens_seen, "bench": bench, "prompts": prompts,
                "first_losses": self.losses[:5], "last_losses": self.losses[-5:]}

    def save(self, folder: Path, provenance: dict) -> Path:
        """The adapted drafter as a drafter folder (loadable by eval, export, init_from), renamed into place."""
        with replace_folder(folder) as staging:
            self.drafter.save_pretrained(staging, safe_serialization=True)
            resolved = self.drafter_path / "resolved_config.yaml"
            if resolved.is_file():
                (staging / "resolved_config.yaml").write_text(resolved.read_text())
            (staging / "adaptation.json").write_text(json_text(provenance, indent=1))
        return folder
