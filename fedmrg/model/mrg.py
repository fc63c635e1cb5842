"""The LLM-driven MRG model: images -> encoder -> projector -> visual tokens -> LM -> report.

    features   = encoder(images, view_mask)                   (B, F)
    diagnosis  = diagnosis_head(features)                     (B, 14, 4)
    prompt     = "Findings to report: ..." from ground truth (teacher forcing) or argmax(diagnosis)
    sequence   = [prompt tokens][visual tokens][report tokens]   fed as inputs_embeds
    decoder    = frozen base LM + peft LoRA adapters `generic` (shared) and `specialized` (private)

Layout of one batch (prompts differ in length, so they are LEFT-padded; reports RIGHT-padded;
positions count real tokens only, exactly as HF `generate` does from the attention mask):

    [pad pad p p p p][v v v v][<s> r r r </s> pad]      attention 0 on pads
      Lp positions    N_v      T_r positions            LM labels only on real report tokens

Every report starts at the same index Lp + N_v, so the LM computes logits only for the last
T_r + 1 positions (`logits_to_keep`): the vocabulary projection never runs over the prompt.

Two decoder paths (mechanism 3 of docs/model.md): generic only (serves unseen centers) and
generic + specialized (serves the center itself), each with its LM loss, tied by a two-way KL.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedmrg.config import DataConfig, ModelConfig
from fedmrg.data.schema import NUM_OBSERVATIONS
from fedmrg.data.transforms import tokenize_reports
from fedmrg.model.base_lm import ensure_pad_token, load_base_lm
from fedmrg.model.encoder import VisionEncoder
from fedmrg.model.heads import DiagnosisHead, ProjectionHead, Projector
from fedmrg.model.lora_targets import (
    LoraTargetError,
    adaptable_modules,
    check_lora_targets,
    resolve_lora_targets,
)
from fedmrg.model.losses import (
    client_aware_contrastive_loss,
    compute_prototypes,
    logit_adjusted_diagnosis_loss,
    mutual_boosting_kl,
    prototype_supcon_loss,
)
from fedmrg.model.prompts import diagnosis_prompt

GENERIC, SPECIALIZED = "generic", "specialized"
IGNORE = -100  # HF convention for "no LM loss here"
REPORT_TOKENS = DataConfig().max_report_tokens  # when the batch brings no input_ids
LOSS_TERMS = ("lm_generic", "lm_personal", "mutual", "diagnosis", "contrastive_global",
              "contrastive_local")


class ModelInputError(ValueError):
    """A batch or argument does not fit the model; the message names the key and shape."""


@dataclass
class SequenceLayout:
    """One batch laid out for the LM (see the module docstring)."""

    embeds: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor  # (B, T) int64, 0 on padding
    position_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) int64, IGNORE on prompt, visual and padding positions
    prompt_len: int  # Lp (left-padded prompt width)
    visual_len: int  # N_v
    report_len: int  # T_r (1 for a generation prefix: just the report's BOS)


class MRGModel(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: VisionEncoder, projector: Projector,
                 diagnosis_head: DiagnosisHead, global_head: ProjectionHead,
                 local_head: ProjectionHead, decoder: PeftModel,
                 tokenizer: PreTrainedTokenizerBase, *, seed: int = 0,
                 max_report_tokens: int = REPORT_TOKENS):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.projector = projector
        self.diagnosis_head = diagnosis_head
        self.global_head = global_head
        self.local_head = local_head
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.seed = seed
        self.max_report_tokens = max_report_tokens
        self.generator = torch.Generator().manual_seed(seed)  # teacher forcing when none given
        self._prompt_ids: dict[tuple[int, ...], list[int]] = {}
        self._active: tuple[str, ...] = ()
        self.last_states: torch.Tensor | None = None  # diagnosis states of the last generate()
        self.last_tokens: torch.Tensor | None = None  # token ids the last generate() produced
        self._own_head: tuple[DiagnosisHead, ...] = ()  # see `own_diagnosis_head`
        if cfg.gradient_checkpointing:
            # Per decoder layer, non-reentrant (the frozen LM's own inputs need no grad). The
            # two decoder passes of a step use different adapters, and a layer is recomputed
            # in the backward pass after both ran: `context_fn` makes each recomputation run
            # with the adapters its forward pass had.
            lm = decoder.get_base_model()
            kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ----------------------------------------------------------------------- building

    @classmethod
    def from_config(cls, cfg: ModelConfig, base_lm: PreTrainedModel | None = None,
                    tokenizer: PreTrainedTokenizerBase | None = None, *, seed: int = 0,
                    max_report_tokens: int = REPORT_TOKENS) -> MRGModel:
        """Build the whole model; `seed` fixes every initialization (same seed, same weights).

        `base_lm` (frozen, then wrapped in place by peft) and `tokenizer` default to
        `load_base_lm(cfg)`; the model takes ownership of the LM passed in.
        """
        if base_lm is None:
            base_lm, tokenizer = load_base_lm(cfg)
        elif tokenizer is None:
            raise ModelInputError("from_config: a base_lm needs its tokenizer")
        ensure_pad_token(tokenizer)
        base_lm.requires_grad_(False)
        lm_hidden = base_lm.get_input_embeddings().embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = VisionEncoder(cfg)
            n_feat = encoder.num_features
            projector = Projector(n_feat, cfg.visual_tokens, lm_hidden)
            diagnosis_head = DiagnosisHead(n_feat)
            global_head = ProjectionHead(n_feat, cfg.projection_dim)
            local_head = ProjectionHead(n_feat, cfg.projection_dim)
            decoder = wrap_decoder(base_lm, cfg)
        return cls(cfg, encoder, projector, diagnosis_head, global_head, local_head, decoder,
                   tokenizer, seed=seed, max_report_tokens=max_report_tokens)

    @property
    def device(self) -> torch.device:
        return self.projector.net[0].weight.device

    @property
    def adapter_names(self) -> list[str]:
        return [GENERIC, SPECIALIZED] if self.cfg.specialized_adapter else [GENERIC]

    @property
    def own_diagnosis_head(self) -> DiagnosisHead | None:
        """A center's own tuned copy of the diagnosis head (`fedmrg.model.head_tuning`), which
        writes the personalized path's prompts; None: the shared head writes them. Held outside
        the module tree (a tuple, not a submodule): it is in no `state_dict`, so it is never
        sent, aggregated or checkpointed; `fedmrg.model.io` saves it beside the modules."""
        return self._own_head[0] if self._own_head else None

    def set_own_diagnosis_head(self, head: DiagnosisHead | None) -> None:
        """Keep `head` as the center's own head (None: drop it). A method, not an attribute
        assignment: nn.Module would register an assigned module as a submodule."""
        self._own_head = () if head is None else (head.eval(),)

    def diagnosis_head_for(self, personalized: bool) -> nn.Module:
        """The head whose argmax a path's prompt shows: the center's own tuned head on the
        personalized path when it has one, else the shared one."""
        own = self.own_diagnosis_head
        if not personalized or own is None:
            return self.diagnosis_head
        # outside the module tree, so `model.to(...)` did not move it: follow the shared head
        weight = self.diagnosis_head.linear.weight
        return own.to(device=weight.device, dtype=weight.dtype)

    def use_adapters(self, personalized: bool) -> None:
        """Activate generic only, or generic + specialized, keeping BOTH trainable.

        peft's set_adapter marks inactive adapters requires_grad=False; both adapters are
        trained (in different passes of the same step), so their flags are restored at once.
        """
        if personalized and not self.cfg.specialized_adapter:
            raise ModelInputError("personalized=True but model.specialized_adapter is false")
        self._activate((GENERIC, SPECIALIZED) if personalized else (GENERIC,))

    def _activate(self, names: tuple[str, ...]) -> None:
        if names == self._active:
            return
        self.decoder.base_model.set_adapter(list(names))
        self.decoder.set_requires_grad(self.adapter_names, requires_grad=True)
        self._active = names

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager,
                                            contextlib.AbstractContextManager]:
        """(forward, recomputation) contexts of one checkpointed layer call (torch's
        `context_fn`): the recomputation runs with the adapters active at its forward."""
        return contextlib.nullcontext(), self._adapters_as(self._active)

    @contextlib.contextmanager
    def _adapters_as(self, names: tuple[str, ...]) -> Iterator[None]:
        current = self._active
        self._activate(names)
        try:
            yield
        finally:
            self._activate(current)

    # ----------------------------------------------------------------------- pieces

    def _batch_tensor(self, batch: dict, key: str, dtype: torch.dtype | None = None) -> (
            torch.Tensor):
        if key not in batch:
            raise ModelInputError(f"batch has no {key!r}; keys: {sorted(batch)}")
        return batch[key].to(self.device, dtype=dtype)

    def encode_features(self, batch: dict) -> torch.Tensor:
        """(B, F) study features of a batch (images + view_mask)."""
        return self.encoder(self._batch_tensor(batch, "images"),
                            self._batch_tensor(batch, "view_mask", torch.bool))

    def prompt_states(self, diagnosis_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 14) states the prompt shows: per sample the ground truth with probability
        `prompt_teacher_forcing` when training, else argmax of the diagnosis head."""
        predicted = diagnosis_logits.detach().argmax(-1)  # (B, 14)
        p = self.cfg.prompt_teacher_forcing
        if not self.training or labels is None or p == 0:
            return predicted
        draw = torch.rand(labels.shape[0], generator=generator or self.generator)
        use_truth = (draw < p).to(labels.device).unsqueeze(1)  # (B, 1)
        return torch.where(use_truth, labels, predicted)

    def _prompt_token_ids(self, states: torch.Tensor) -> list[list[int]]:
        out = []
        for row in states.tolist():
            key = tuple(row)
            if key not in self._prompt_ids:
                if len(self._prompt_ids) > 50_000:  # bounded memo; 4^14 prompts are possible
                    self._prompt_ids.clear()
                text = diagnosis_prompt(row)
                self._prompt_ids[key] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(self._prompt_ids[key])
        return out

    def build_sequence(self, features: torch.Tensor, states: torch.Tensor | None,
                       report_ids: torch.Tensor, report_mask: torch.Tensor) -> SequenceLayout:
        """Lay out [prompt][visual][report] as inputs_embeds with mask, positions and labels.

        states (B, 14) or None (no prompt); report_ids/report_mask (B, T_r) right-padded.
        """
        B, dev = features.shape[0], features.device
        embed = self.decoder.get_input_embeddings()
        pad_id = self.tokenizer.pad_token_id
        # Prompt, left-padded to the longest one in the batch: (B, Lp)
        if self.cfg.diagnosis_prompts and states is not None:
            prompts = self._prompt_token_ids(states)
            lp = max(len(p) for p in prompts)
            prompt_ids = torch.full((B, lp), pad_id, dtype=torch.long)
            prompt_mask = torch.zeros((B, lp), dtype=torch.long)
            for i, p in enumerate(prompts):
                if p:
                    prompt_ids[i, lp - len(p):] = torch.tensor(p)
                    prompt_mask[i, lp - len(p):] = 1
            prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        else:
            lp = 0
            prompt_ids = torch.zeros((B, 0), dtype=torch.long, device=dev)
            prompt_mask = torch.zeros((B, 0), dtype=torch.long, device=dev)
        visual = self.projector(features)  # (B, N_v, D)
        nv, tr = visual.shape[1], report_ids.shape[1]
        embeds = torch.cat([embed(prompt_ids), visual.to(embed.weight.dtype),
                            embed(report_ids)], dim=1)  # (B, Lp + N_v + T_r, D)
        attention_mask = torch.cat([prompt_mask, torch.ones((B, nv), dtype=torch.long, device=dev),
                                    report_mask.long()], dim=1)  # (B, T)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
        labels = torch.full_like(attention_mask, IGNORE)
        labels[:, lp + nv:] = report_ids.masked_fill(report_mask == 0, IGNORE)
        return SequenceLayout(embeds, attention_mask, position_ids, labels, lp, nv, tr)

    def report_logits(self, seq: SequenceLayout, personalized: bool) -> torch.Tensor:
        """(B, T_r, V) next-token logits aligned with the report tokens of `seq`."""
        self.use_adapters(personalized)
        out = self.decoder(inputs_embeds=seq.embeds, attention_mask=seq.attention_mask,
                           position_ids=seq.position_ids, logits_to_keep=seq.report_len + 1,
                           use_cache=False)
        # position t predicts token t + 1; float32 for the losses whatever the LM's dtype
        return out.logits[:, :-1].float()

    def _report_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "input_ids" in batch:
            ids = self._batch_tensor(batch, "input_ids", torch.long)
            mask = self._batch_tensor(batch, "attention_mask", torch.long)
        elif "report" in batch:
            ids, mask = (torch.from_numpy(a).to(self.device) for a in tokenize_reports(
                self.tokenizer, batch["report"], self.max_report_tokens))
        else:
            raise ModelInputError(f"batch needs 'input_ids'/'attention_mask' or 'report'; keys: "
                                  f"{sorted(batch)}")
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ModelInputError(f"input_ids {tuple(ids.shape)} and attention_mask "
                                  f"{tuple(mask.shape)} must be the same (B, T)")
        width = int(mask.sum(1).max())  # trim the padding every row shares
        return ids[:, :width], mask[:, :width]

    # ----------------------------------------------------------------------- training

    def forward(self, batch: dict, prototypes: torch.Tensor | None = None,
                proto_counts: torch.Tensor | None = None, log_prior: torch.Tensor | None = None,
                generator: torch.Generator | None = None, return_features: bool = False) -> dict:
        """Every loss term of `cfg.losses` with a weight > 0 (others are not computed).

        Returns {"loss": weighted sum (tensor), <term>: float for each computed term,
        "features": (B, F) if asked}. `contrastive_global` needs `prototypes`/`proto_counts`
        (skipped when None); `log_prior` (14, 4) turns on logit adjustment of the diagnosis loss.
        """
        w = self.cfg.losses
        labels = self._batch_tensor(batch, "labels", torch.long)  # (B, 14)
        if labels.ndim != 2 or labels.shape[1] != NUM_OBSERVATIONS:
            raise ModelInputError(f"batch['labels']: expected (B, {NUM_OBSERVATIONS}), got "
                                  f"{tuple(labels.shape)}")
        features = self.encode_features(batch)  # (B, F)
        diagnosis_logits = self.diagnosis_head(features)  # (B, 14, 4)
        terms: dict[str, torch.Tensor] = {}

        personal = self.cfg.specialized_adapter
        need_personal = personal and (w.lm_personal > 0 or w.mutual > 0)
        need_generic = w.lm_generic > 0 or (personal and w.mutual > 0)
        if need_generic or need_personal:
            states = self.prompt_states(diagnosis_logits, labels, generator)
            report_ids, report_mask = self._report_tokens(batch)
            seq = self.build_sequence(features, states, report_ids, report_mask)
            target = seq.labels[:, -seq.report_len:]  # (B, T_r)
            token_mask = target != IGNORE  # (B, T_r)
            if need_generic:
                generic = self.report_logits(seq, personalized=False)  # (B, T_r, V)
                if w.lm_generic > 0:
                    terms["lm_generic"] = _lm_loss(generic, target, token_mask)
            if need_personal:
                personal_logits = self.report_logits(seq, personalized=True)
                if w.lm_personal > 0:
                    terms["lm_personal"] = _lm_loss(personal_logits, target, token_mask)
                if w.mutual > 0:
                    terms["mutual"] = mutual_boosting_kl(generic, personal_logits, token_mask,
                                                         w.mutual_temperature)
        if w.diagnosis > 0:
            terms["diagnosis"] = logit_adjusted_diagnosis_loss(
                diagnosis_logits, labels, log_prior, w.diagnosis_logit_adjust_tau)
        if w.contrastive_global > 0 and prototypes is not None:
            if proto_counts is None:
                raise ModelInputError("prototypes given without proto_counts")
            terms["contrastive_global"] = prototype_supcon_loss(
                self.global_head(features), labels, prototypes.to(self.device),
                proto_counts.to(self.device), w.contrastive_temperature)
        if w.contrastive_local > 0:
            terms["contrastive_local"] = client_aware_contrastive_loss(
                self.local_head(features), labels, w.contrastive_temperature,
                center_ids=batch.get("center"), min_jaccard=w.local_positive_jaccard)
        if not terms:
            raise ModelInputError("no loss term to compute: every weight in model.losses is 0 "
                                  "(or only contrastive_global, without prototypes)")
        out: dict = {"loss": sum(getattr(w, k) * v for k, v in terms.items())}
        out.update({k: float(v.detach()) for k, v in terms.items()})
        if return_features:
            out["features"] = features
        return out

    @torch.no_grad()
    def local_prototypes(self, batches: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagnosis prototypes of local data in the global head's space: ((14, P), (14,))."""
        was_training = self.training
        self.eval()
        try:
            zs, labels = [], []
            for batch in batches:
                zs.append(self.global_head(self.encode_features(batch)))
                labels.append(self._batch_tensor(batch, "labels", torch.long))
        finally:
            self.train(was_training)
        if not zs:
            raise ModelInputError("local_prototypes: no batches")
        return compute_prototypes(torch.cat(zs), torch.cat(labels))

    # ----------------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(self, images: torch.Tensor, view_mask: torch.Tensor, personalized: bool = False,
                 num_beams: int = 3, max_new_tokens: int = REPORT_TOKENS, min_new_tokens: int = 0,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 states: torch.Tensor | None = None,
                 return_states: bool = False) -> list[str] | tuple[list[str], torch.Tensor]:
        """Reports for a batch of studies (greedy when num_beams=1; no sampling).

        The prompt shows the diagnosis head's predictions (`diagnosis_head_for(personalized)`)
        unless `states` (B, 14) is given;
        the states used are kept in `last_states` and returned with `return_states`, the
        generated token ids (B, new) in `last_tokens`. `repetition_penalty` and
        `no_repeat_ngram_size` act on the generated tokens only (the prefix is embeddings).
        """
        was_training = self.training
        self.eval()
        try:
            features = self.encoder(images.to(self.device), view_mask.to(self.device, torch.bool))
            if states is None:
                states = self.diagnosis_head_for(personalized)(features).argmax(-1)  # (B, 14)
            states = states.to(self.device, torch.long)
            B = features.shape[0]
            bos = self.tokenizer.bos_token_id
            # The prefix ends with the report's BOS, as in training; no BOS -> nothing to add.
            width = 1 if bos is not None else 0
            start = torch.full((B, width), bos if bos is not None else 0, dtype=torch.long,
                               device=self.device)
            seq = self.build_sequence(features, states, start, torch.ones_like(start))
            self.use_adapters(personalized)
            gen_cfg = GenerationConfig(
                num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                bos_token_id=bos)
            with warnings.catch_warnings():
                # The penalty and the n-gram ban apply to generated tokens only; that is what
                # we want here (the prefix is image and prompt embeddings, not words).
                warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds.*")
                warnings.filterwarnings("ignore",
                                        message=".*no_repeat_ngram_size.*inputs_embeds.*")
                new_tokens = self.decoder.get_base_model().generate(
                    inputs_embeds=seq.embeds, attention_mask=seq.attention_mask,
                    generation_config=gen_cfg)  # (B, new) : only the generated tokens
        finally:
            self.train(was_training)
        texts = [t.strip() for t in
                 self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        self.last_states = states.cpu()
        self.last_tokens = new_tokens.cpu()
        return (texts, self.last_states) if return_states else texts


def wrap_decoder(base_lm: PreTrainedModel, cfg: ModelConfig) -> PeftModel:
    """The frozen LM with LoRA adapters `generic` (+ `specialized`) on `cfg.lora_targets`, or
    on the attention projections of the LM's architecture when that list is empty
    (`fedmrg.model.lora_targets`). The adapters are float32 whatever the base LM's dtype
    (peft's `autocast_adapter_dtype`)."""
    model_type = getattr(base_lm.config, "model_type", "")
    try:
        targets = resolve_lora_targets(model_type, cfg.lora_targets)
        check_lora_targets(targets.modules, adaptable_modules(base_lm), f"the LM ({model_type})")
    except LoraTargetError as e:
        raise ModelInputError(str(e)) from e
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(targets.modules),
                      fan_in_fan_out=targets.fan_in_fan_out, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        decoder = get_peft_model(base_lm, lora, adapter_name=GENERIC)
    if cfg.specialized_adapter:
        decoder.add_adapter(SPECIALIZED, lora)
    decoder.base_model.set_adapter([GENERIC])
    decoder.set_requires_grad([GENERIC, SPECIALIZED] if cfg.specialized_adapter else [GENERIC])
    return decoder


def _lm_loss(logits: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor) -> (
        torch.Tensor):
    """Mean next-token cross-entropy over the real report tokens."""
    return F.cross_entropy(logits[token_mask].float(), target[token_mask])
