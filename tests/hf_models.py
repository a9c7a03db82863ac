"""Tiny randomly initialized transformers encoders with their own tokenizers, built offline:
a RoBERTa with a byte-level BPE vocabulary and a DeBERTa-v2 (v3-style: relative attention,
no segment embeddings) with a WordPiece vocabulary, both trained here on a few sentences."""

from __future__ import annotations

from pathlib import Path

import torch

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _corpus(data_dir: Path, n: int = 3000) -> list[str]:
    from mtbert.data.readers import load_split

    texts = [ex.text for ex in load_split("sst", "train", data_dir, warn=False).examples[:n]]
    texts += [ex.text for ex in load_split("para", "train", data_dir, warn=False).examples[:n]]
    return texts


def roberta_folder(folder: Path, data_dir: Path, seed: int = 0) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as RoBERTa's
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(data_dir), vocab_size=2000, min_frequency=2, special_tokens=special,
                            show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                  mask_token="<mask>")
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tok), max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1, **SIZE)
    RobertaModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def deberta_folder(folder: Path, data_dir: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(_corpus(data_dir), trainers.WordPieceTrainer(vocab_size=2000, special_tokens=special,
                                                                       show_progress=False))
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
                                  pad_token="[PAD]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=0, type_vocab_size=0,
                             relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True, **SIZE)
    DebertaV2Model(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
