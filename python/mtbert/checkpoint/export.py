"""Export a trained checkpoint to the standard formats: a transformers BERT folder that is
also a sentence-transformers model, with the task heads in mtbert's own format beside it.

    out/
      config.json, model.safetensors        the fine-tuned encoder (transformers' BertModel, or
                                            for --backbone hf the model's own save_pretrained)
      vocab.txt, tokenizer_config.json,     its tokenizer (BertTokenizer, same settings; for
      special_tokens_map.json               --backbone hf the tokenizer's own files)
      modules.json, sentence_bert_config.json,
      1_Pooling/config.json                 sentence-transformers: the run's pooling
      2_Dense/                              (pooling "pooler" only: the pooler as Dense + Tanh)
      mtbert_heads/heads.safetensors        the task heads (keys of MultitaskBert.heads)
      mtbert_heads/mtbert.json              the checkpoint's mtbert.json (model, train, tokenizer)

Only files are written; neither transformers nor sentence-transformers is imported.
`load_export` rebuilds the MultitaskBert from such a folder.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import format as ckpt
from ..evaluation.inference import checkpoint_folder, load_checkpoint
from ..model.backbone import load_encoder
from ..model.multitask import MultitaskBert, MultitaskConfig
from ..data.hf_tokenizer import HFTokenizer, load_tokenizer
from ..data.tokenizer import WordPieceTokenizer

HEADS_DIR = "mtbert_heads"
HEADS_FILE = "heads.safetensors"
HEADS_META = ckpt.META_FILE  # the checkpoint's mtbert.json, so ckpt.read_meta reads it
DEFAULT_MAX_LENGTH = 128  # as inference assumes for a checkpoint without training settings
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_DENSE = "sentence_transformers.models.Dense"
# sentence-transformers pooling of each MultitaskBert pooling; "pooler" is [CLS] then the
# pooler's tanh(dense(.)), which a Dense module with a Tanh activation computes exactly.
ST_POOLING_MODES = {"mean": "mean", "cls": "cls", "pooler": "cls"}


class ExportWarning(UserWarning):
    """Part of an export could not be written (e.g. a pooling sentence-transformers lacks)."""


@dataclass
class ExportResult:
    source: Path  # the checkpoint folder that was exported
    source_kind: str  # how it was found: "checkpoint folder", "run's best/", "run's last/"
    out: Path
    pooling: str
    sentence_transformers: bool  # whether the sentence-transformers files were written
    notes: list[str] = field(default_factory=list)
    encoder: str = "BertModel"  # the transformers class that loads the encoder (RobertaModel, ...)


def export_source(path) -> tuple[Path, str]:
    """The checkpoint folder to export and how it was found: `path` itself when it is a
    checkpoint (a run's best/ or last/), else the run folder's best/, else its last/."""
    path = Path(path)
    try:
        folder = checkpoint_folder(path)
    except ckpt.CheckpointError:
        last = ckpt.existing_folder(path / "last") if path.is_dir() else None
        if last is None or not (last / ckpt.META_FILE).is_file():
            raise
        return last, "run's last/ (it has no best/)"
    return folder, ("checkpoint folder" if folder == path else f"run's {folder.name}/")


def st_pooling_mode(pooling: str) -> str:
    """The sentence-transformers pooling mode for a MultitaskBert pooling (ValueError if none)."""
    if pooling not in ST_POOLING_MODES:
        raise ValueError(f"pooling {pooling!r} has no sentence-transformers equivalent "
                         f"(supported: {', '.join(ST_POOLING_MODES)})")
    return ST_POOLING_MODES[pooling]


def _check_out(out: Path, source: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    src = source.resolve()
    if out.resolve() == src or out.resolve() in src.parents:
        raise ValueError(f"--out {str(out)!r} holds the checkpoint being exported; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {str(out)!r} is not empty; pass --force to replace it")
    # --force replaces an earlier export, never the folder we stand in nor a run's own files
    if out.is_dir() and (out.resolve() == Path.cwd().resolve() or out.resolve() in Path.cwd().resolve().parents):
        raise ValueError(f"--out {str(out)!r} is the current folder or holds it; choose another folder")
    for marker, what in ((ckpt.META_FILE, "an mtbert checkpoint"), ("metrics.jsonl", "an mtbert run folder")):
        if (out / marker).exists():
            raise ValueError(f"--out {str(out)!r} is {what}; --force replaces only an earlier export")
    if out.is_dir() and any(out.iterdir()) and not (out / HEADS_DIR).is_dir():
        raise ValueError(f"--out {str(out)!r} holds files that are not an mtbert export (no {HEADS_DIR}/); "
                         f"--force replaces only an earlier export")


def export_checkpoint(checkpoint, out, *, force: bool = False) -> ExportResult:
    """Write the checkpoint at `checkpoint` (a checkpoint or run folder) as an export folder
    `out`, atomically. A non-empty `out` is replaced only with force=True."""
    if not str(out).strip():  # Path("") is the current folder
        raise ValueError("--out is empty; name the folder to write the export into")
    source, kind = export_source(checkpoint)
    _check_out(Path(out), source, force)
    out = Path(out).absolute()  # write_folder_atomically needs a name for its sibling temp folder
    model, meta, tokenizer = load_checkpoint(source)
    max_length = meta.get("train", {}).get("max_length", DEFAULT_MAX_LENGTH)
    result = ExportResult(source, kind, out, model.config.pooling, sentence_transformers=True,
                          encoder=type(getattr(model.bert, "model", model.bert)).__name__)
    try:
        mode = st_pooling_mode(model.config.pooling)
    except ValueError as exc:
        result.sentence_transformers = False
        result.notes.append(f"sentence-transformers files not written: {exc}")
        warnings.warn(result.notes[-1], ExportWarning, stacklevel=2)
        mode = None

    def fill(folder: Path) -> None:
        model.bert.save_pretrained(folder)  # config.json (BertModel, or the model's own) + model.safetensors
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save_files(folder)  # the transformers tokenizer's own files
        else:
            shutil.copyfile(source / ckpt.VOCAB_FILE, folder / ckpt.VOCAB_FILE)
            _write_tokenizer_files(folder, tokenizer, max_length)
        if mode is not None:
            _write_sentence_transformers_files(folder, model, mode, max_length)
        heads = folder / HEADS_DIR
        heads.mkdir()
        save_file(ckpt.contiguous_state(model.heads), str(heads / HEADS_FILE))
        ckpt.write_json(heads / HEADS_META, {**meta, "exported_from": str(source)})

    ckpt.write_folder_atomically(out, fill)
    return result


def _write_tokenizer_files(folder: Path, tokenizer: WordPieceTokenizer, max_length: int) -> None:
    special = {k: v for k, v in SPECIAL_TOKENS.items()
               if k != "mask_token" or tokenizer.mask_token_id is not None}
    ckpt.write_json(folder / "special_tokens_map.json", special)
    ckpt.write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": tokenizer.lowercase,
        "strip_accents": tokenizer.strip_accents,
        "tokenize_chinese_chars": True,  # always on in our tokenizer
        "do_basic_tokenize": True,
        "never_split": None,
        "clean_up_tokenization_spaces": True,
        "model_max_length": max_length,  # the length the encoder was fine-tuned with
        **special,
    })


def _write_sentence_transformers_files(folder: Path, model: MultitaskBert, mode: str,
                                       max_length: int) -> None:
    hidden = model.bert.config.hidden_size
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING}]
    # do_lower_case False: the tokenizer lowercases itself (tokenizer_config.json).
    ckpt.write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    (folder / "1_Pooling").mkdir()
    ckpt.write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    if model.config.pooling == "pooler":
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": ST_DENSE})
        dense = folder / "2_Dense"
        dense.mkdir()
        ckpt.write_json(dense / "config.json", {
            "in_features": hidden, "out_features": hidden, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"})
        pooler = model.bert.pooler.dense
        save_file({"linear.weight": pooler.weight.detach().contiguous().cpu(),
                   "linear.bias": pooler.bias.detach().contiguous().cpu()}, str(dense / "model.safetensors"))
    ckpt.write_json(folder / "modules.json", modules)


def load_export(folder, *, device: Optional[torch.device] = None
                ) -> tuple[MultitaskBert, dict, WordPieceTokenizer | HFTokenizer]:
    """The MultitaskBert of an export folder (encoder + heads), its meta and tokenizer."""
    folder = Path(folder)
    heads = folder / HEADS_DIR
    meta = ckpt.read_meta(heads)
    try:
        config = MultitaskConfig.from_dict(meta["model"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"{heads / HEADS_META}: bad model configuration: {exc}") from None
    model = MultitaskBert(config, encoder=load_encoder(folder, config.backbone))
    ckpt.load_state_into(model.heads, ckpt.load_tensors(heads / HEADS_FILE), heads / HEADS_FILE)
    tokenizer = load_tokenizer(folder, config.backbone)
    model.to(device or torch.device("cpu")).eval()
    return model, meta, tokenizer
