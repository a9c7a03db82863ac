"""BERT WordPiece in plain Python: the slow path, the documentation, and a test oracle.

It computes exactly what the Rust core (`rust/wordpiece.rs`) computes, the ids
of the `tokenizers` library's `BertWordPieceTokenizer`, one readable step at a
time:

1. split the raw text around special tokens written in it (`[CLS]`, `[SEP]`, ...);
2. normalize each piece: drop NUL, U+FFFD and Cc/Cf/Co characters, turn
   whitespace into a space, put spaces around CJK ideographs; then, when
   stripping accents, NFD and drop non-spacing marks (Mn); then, when
   lowercasing, lowercase character by character;
3. pre-tokenize: split on whitespace and isolate each punctuation character;
4. WordPiece each word: greedy longest match first, `##` on later pieces; a
   word longer than 100 characters or not fully covered is `[UNK]`.

The reference classifies characters with Unicode 9 tables (the `unicode_categories`
and `unicode-normalization-alignments` crates) and lowercases with Rust's Unicode 17
tables, while `unicodedata` follows the running Python's Unicode version. So
the classes are spelled out below as code-point ranges taken from those crates
(`_OTHER`, `_PUNCT`, `_MN`), NFD treats characters the reference does not know
as plain starters (`_NFD_NEW`), and a few newer lowercase pairs are patched in.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from typing import Optional, Sequence

import numpy as np

MAX_INPUT_CHARS_PER_WORD = 100
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
REQUIRED_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]")

# Rust's char::is_whitespace (the Unicode White_Space property).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_ASCII_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _is_cjk(cp: int) -> bool:
    """The reference's CJK ideograph ranges (0x2B820-0x2B91F is not among them)."""
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B920 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _in(cp: int, table: tuple[list[int], list[int]]) -> bool:
    starts, ends = table
    i = bisect.bisect_right(starts, cp) - 1
    return i >= 0 and cp <= ends[i]


def _is_removed(c: str) -> bool:
    """Dropped by the reference's clean_text: NUL, U+FFFD, and Cc/Cf/Co except tab, LF, CR."""
    return c == "\0" or c == "\ufffd" or (c not in "\t\n\r" and _in(ord(c), _OTHER))


def _is_punct(c: str) -> bool:
    return c in _ASCII_PUNCT or _in(ord(c), _PUNCT)


def _nfd(text: str) -> str:
    """NFD with the reference's Unicode 9 tables: a character it does not know
    is a starter without decomposition, which splits the text into segments."""
    if not any(_in(ord(c), _NFD_NEW) for c in text):
        return unicodedata.normalize("NFD", text)
    out, segment = [], []
    for c in text:
        if _in(ord(c), _NFD_NEW):
            out.append(unicodedata.normalize("NFD", "".join(segment)))
            out.append(c)
            segment = []
        else:
            segment.append(c)
    out.append(unicodedata.normalize("NFD", "".join(segment)))
    return "".join(out)


def _lower(c: str) -> str:
    """Rust's char::to_lowercase: per character, so no final-sigma rule."""
    return _LOWER_PATCH.get(c) or c.lower()


def _check_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    return value


def _check_texts(values, what: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a list of str, not a single {type(values).__name__}")
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{what} must be a list of str, not {type(values).__name__}") from None
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{what}[{i}] must be str, not {type(v).__name__}")
    return values


def _check_max_length(max_length, is_pair: bool, truncation: bool) -> None:
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int or None, not {type(max_length).__name__}")
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, not {max_length}")
    need = 3 if is_pair else 2
    if max_length < need and truncation:
        kind = "pair" if is_pair else "single sentence"
        raise ValueError(f"max_length={max_length} leaves no room for the {need} special tokens of a {kind}")


class PyWordPiece:
    """Same constructor arguments and methods as the native `_WordPiece`, and the same
    argument checks (types and ranges) with the same exceptions."""

    def __init__(self, vocab_text: str, lowercase: bool = True, strip_accents: Optional[bool] = None):
        # One token per line (split on \n only, unlike str.splitlines), trailing
        # whitespace trimmed; a repeated token keeps its last id.
        lines = vocab_text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        self._tokens = [_rstrip_ws(line) for line in lines]
        self._vocab = {tok: i for i, tok in enumerate(self._tokens)}
        missing = [t for t in REQUIRED_TOKENS if t not in self._vocab]
        if missing:
            raise ValueError(f"vocabulary lacks required token(s) {', '.join(missing)}")
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self._specials = [t for t in SPECIAL_TOKENS if t in self._vocab]
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self._specials) + ")")
        self.unk_id = self._vocab["[UNK]"]
        self.cls_id = self._vocab["[CLS]"]
        self.sep_id = self._vocab["[SEP]"]
        self.pad_id = self._vocab["[PAD]"]
        self.mask_id = self._vocab.get("[MASK]")

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    # -- 2. normalizer ------------------------------------------------------
    def normalize(self, text: str) -> str:
        out = []
        for c in text:
            if _is_removed(c):
                continue
            if c in _WHITESPACE:
                out.append(" ")
            elif _is_cjk(ord(c)):
                out.append(f" {c} ")
            else:
                out.append(c)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in _nfd(text) if not _in(ord(c), _MN))
        if self.lowercase:
            text = "".join(_lower(c) for c in text)
        return text

    # -- 1 + 3. special tokens, pre-tokenizer ---------------------------------
    def words(self, text: str) -> list[str]:
        text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError (a ValueError), as in Rust
        words: list[str] = []
        for piece in self._special_re.split(text) if self._specials else [text]:
            if piece in self._specials:
                words.append(piece)
                continue
            word = []
            for c in self.normalize(piece):
                if c in _WHITESPACE or _is_punct(c):
                    if word:
                        words.append("".join(word))
                        word = []
                    if c not in _WHITESPACE:
                        words.append(c)
                else:
                    word.append(c)
            if word:
                words.append("".join(word))
        return words

    # -- 4. WordPiece ---------------------------------------------------------
    def _word_ids(self, word: str) -> list[int]:
        if word in self._specials:
            return [self._vocab[word]]
        if len(word) > MAX_INPUT_CHARS_PER_WORD:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._vocab:
                    ids.append(self._vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return ids

    def _text_ids(self, text: str) -> list[int]:
        return [i for w in self.words(text) for i in self._word_ids(w)]

    def tokenize(self, text: str) -> list[str]:
        return [self._tokens[i] for i in self._text_ids(_check_text(text, "text"))]

    def encode(self, text: str, pair: Optional[str] = None, max_length: Optional[int] = None,
               truncation: bool = True) -> list[int]:
        _check_text(text, "text")
        if pair is not None:
            _check_text(pair, "pair")
        _check_max_length(max_length, pair is not None, truncation)
        ids, _ = self._encode_row(text, pair, max_length if truncation else None)
        return ids

    def _encode_row(self, text: str, pair: Optional[str], max_length: Optional[int]):
        a = self._text_ids(text)
        b = self._text_ids(pair) if pair is not None else []
        if max_length is not None:
            na, nb = truncated_lengths(len(a), len(b), max_length, pair is not None)
            a, b = a[:na], b[:nb]
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if pair is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def encode_batch(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
                     max_length: Optional[int] = None, truncation: bool = True,
                     pad_to_max_length: bool = False, num_threads: int = 0):
        del num_threads  # one thread: this is the slow path
        texts = _check_texts(texts, "texts")
        if pairs is not None:
            pairs = _check_texts(pairs, "pairs")
        _check_max_length(max_length, pairs is not None, truncation)
        if pad_to_max_length and max_length is None:
            raise ValueError("padding to max_length needs a max_length")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"texts and pairs differ in length ({len(texts)} and {len(pairs)})")
        limit = max_length if truncation else None
        rows = [self._encode_row(t, pairs[i] if pairs is not None else None, limit)
                for i, t in enumerate(texts)]
        width = max((len(ids) for ids, _ in rows), default=0)
        if pad_to_max_length:
            width = max(width, max_length)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((len(rows), width), dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, (ids, types) in enumerate(rows):
            input_ids[r, : len(ids)] = ids
            token_type_ids[r, : len(ids)] = types
            attention_mask[r, : len(ids)] = 1
        return input_ids, token_type_ids, attention_mask

    def token_to_id(self, token: str) -> Optional[int]:
        return self._vocab.get(token)

    def tokens(self) -> list[str]:
        return list(self._tokens)


def truncated_lengths(na: int, nb: int, max_length: int, is_pair: bool) -> tuple[int, int]:
    """Segment lengths after truncating a row to max_length ids, longest first as the reference:
    if the shorter segment fits in half, the longer gets the rest; otherwise both get half,
    the longer one (the second on a tie) the odd one."""
    target = max(0, max_length - (3 if is_pair else 2))
    if not is_pair:
        return min(na, target), 0
    if na + nb <= target:
        return na, nb
    n1 = min(na, nb)
    n2 = n1 if n1 > target else max(n1, target - n1)
    if n1 + n2 > target:
        n1, n2 = target // 2, target // 2 + target % 2
    ka, kb = (n2, n1) if na > nb else (n1, n2)
    return min(ka, na), min(kb, nb)


def _rstrip_ws(line: str) -> str:
    """Rust's str::trim_end: strip trailing White_Space characters."""
    end = len(line)
    while end and line[end - 1] in _WHITESPACE:
        end -= 1
    return line[:end]


# ---------------------------------------------------------------------------
# The reference's Unicode tables (generated from the `unicode_categories` 0.1.1
# crate, the `unicode-normalization-alignments` 0.1.12 crate and Rust's Unicode
# 17 lowercase mapping; checked over every code point by tests/test_tokenizer.py).
# ---------------------------------------------------------------------------


def _ranges(spec: str) -> tuple[list[int], list[int]]:
    starts, ends = [], []
    for item in spec.split():
        lo, _, hi = item.partition("-")
        starts.append(int(lo, 16))
        ends.append(int(hi or lo, 16))
    return starts, ends


def _lower_patch(spec: str) -> dict[str, str]:
    patch = {}
    for item in spec.split():
        src, _, dst = item.partition(">")
        lo, _, hi = src.partition("-")
        lo, hi, dst = int(lo, 16), int(hi or lo, 16), int(dst, 16)
        for cp in range(lo, hi + 1):
            patch[chr(cp)] = chr(dst + cp - lo)
    return patch


# Cc, Cf and Co (removed by clean_text; tab, LF and CR excepted in code).
_OTHER = _ranges("""
0000-001F 007F-009F 00AD 0600-0605 061C 06DD 070F 180E
200B-200F 202A-202E 2060-2064 2066-206F E000-F8FF FEFF FFF9-FFFB 110BD
1BCA0-1BCA3 1D173-1D17A E0001 E0020-E007F F0000-FFFFD 100000-10FFFD
""")

# Unicode punctuation (P*); ASCII punctuation is added in code.
_PUNCT = _ranges("""
0021-0023 0025-002A 002C-002F 003A-003B 003F-0040 005B-005D 005F 007B
007D 00A1 00A7 00AB 00B6-00B7 00BB 00BF 037E
0387 055A-055F 0589-058A 05BE 05C0 05C3 05C6 05F3-05F4
0609-060A 060C-060D 061B 061E-061F 066A-066D 06D4 0700-070D 07F7-07F9
0830-083E 085E 0964-0965 0970 0AF0 0DF4 0E4F 0E5A-0E5B
0F04-0F12 0F14 0F3A-0F3D 0F85 0FD0-0FD4 0FD9-0FDA 104A-104F 10FB
1360-1368 1400 166D-166E 169B-169C 16EB-16ED 1735-1736 17D4-17D6 17D8-17DA
1800-180A 1944-1945 1A1E-1A1F 1AA0-1AA6 1AA8-1AAD 1B5A-1B60 1BFC-1BFF 1C3B-1C3F
1C7E-1C7F 1CC0-1CC7 1CD3 2010-2027 2030-2043 2045-2051 2053-205E 207D-207E
208D-208E 2308-230B 2329-232A 2768-2775 27C5-27C6 27E6-27EF 2983-2998 29D8-29DB
29FC-29FD 2CF9-2CFC 2CFE-2CFF 2D70 2E00-2E2E 2E30-2E42 3001-3003 3008-3011
3014-301F 3030 303D 30A0 30FB A4FE-A4FF A60D-A60F A673
A67E A6F2-A6F7 A874-A877 A8CE-A8CF A8F8-A8FA A8FC A92E-A92F A95F
A9C1-A9CD A9DE-A9DF AA5C-AA5F AADE-AADF AAF0-AAF1 ABEB FD3E-FD3F FE10-FE19
FE30-FE52 FE54-FE61 FE63 FE68 FE6A-FE6B FF01-FF03 FF05-FF0A FF0C-FF0F
FF1A-FF1B FF1F-FF20 FF3B-FF3D FF3F FF5B FF5D FF5F-FF65 10100-10102
1039F 103D0 1056F 10857 1091F 1093F 10A50-10A58 10A7F
10AF0-10AF6 10B39-10B3F 10B99-10B9C 11047-1104D 110BB-110BC 110BE-110C1 11140-11143 11174-11175
111C5-111C9 111CD 111DB 111DD-111DF 11238-1123D 112A9 114C6 115C1-115D7
11641-11643 1173C-1173E 12470-12474 16A6E-16A6F 16AF5 16B37-16B3B 16B44 1BC9F
1DA87-1DA8B
""")

# Non-spacing marks (Mn), dropped when stripping accents.
_MN = _ranges("""
0300-036F 0483-0487 0591-05BD 05BF 05C1-05C2 05C4-05C5 05C7 0610-061A
064B-065F 0670 06D6-06DC 06DF-06E4 06E7-06E8 06EA-06ED 0711 0730-074A
07A6-07B0 07EB-07F3 0816-0819 081B-0823 0825-0827 0829-082D 0859-085B 08E3-0902
093A 093C 0941-0948 094D 0951-0957 0962-0963 0981 09BC
09C1-09C4 09CD 09E2-09E3 0A01-0A02 0A3C 0A41-0A42 0A47-0A48 0A4B-0A4D
0A51 0A70-0A71 0A75 0A81-0A82 0ABC 0AC1-0AC5 0AC7-0AC8 0ACD
0AE2-0AE3 0B01 0B3C 0B3F 0B41-0B44 0B4D 0B56 0B62-0B63
0B82 0BC0 0BCD 0C00 0C3E-0C40 0C46-0C48 0C4A-0C4D 0C55-0C56
0C62-0C63 0C81 0CBC 0CBF 0CC6 0CCC-0CCD 0CE2-0CE3 0D01
0D41-0D44 0D4D 0D62-0D63 0DCA 0DD2-0DD4 0DD6 0E31 0E34-0E3A
0E47-0E4E 0EB1 0EB4-0EB9 0EBB-0EBC 0EC8-0ECD 0F18-0F19 0F35 0F37
0F39 0F71-0F7E 0F80-0F84 0F86-0F87 0F8D-0F97 0F99-0FBC 0FC6 102D-1030
1032-1037 1039-103A 103D-103E 1058-1059 105E-1060 1071-1074 1082 1085-1086
108D 109D 135D-135F 1712-1714 1732-1734 1752-1753 1772-1773 17B4-17B5
17B7-17BD 17C6 17C9-17D3 17DD 180B-180D 18A9 1920-1922 1927-1928
1932 1939-193B 1A17-1A18 1A1B 1A56 1A58-1A5E 1A60 1A62
1A65-1A6C 1A73-1A7C 1A7F 1AB0-1ABD 1B00-1B03 1B34 1B36-1B3A 1B3C
1B42 1B6B-1B73 1B80-1B81 1BA2-1BA5 1BA8-1BA9 1BAB-1BAD 1BE6 1BE8-1BE9
1BED 1BEF-1BF1 1C2C-1C33 1C36-1C37 1CD0-1CD2 1CD4-1CE0 1CE2-1CE8 1CED
1CF4 1CF8-1CF9 1DC0-1DF5 1DFC-1DFF 20D0-20DC 20E1 20E5-20F0 2CEF-2CF1
2D7F 2DE0-2DFF 302A-302D 3099-309A A66F A674-A67D A69E-A69F A6F0-A6F1
A802 A806 A80B A825-A826 A8C4 A8E0-A8F1 A926-A92D A947-A951
A980-A982 A9B3 A9B6-A9B9 A9BC A9E5 AA29-AA2E AA31-AA32 AA35-AA36
AA43 AA4C AA7C AAB0 AAB2-AAB4 AAB7-AAB8 AABE-AABF AAC1
AAEC-AAED AAF6 ABE5 ABE8 ABED FB1E FE00-FE0F FE20-FE2F
101FD 102E0 10376-1037A 10A01-10A03 10A05-10A06 10A0C-10A0F 10A38-10A3A 10A3F
10AE5-10AE6 11001 11038-11046 1107F-11081 110B3-110B6 110B9-110BA 11100-11102 11127-1112B
1112D-11134 11173 11180-11181 111B6-111BE 111CA-111CC 1122F-11231 11234 11236-11237
112DF 112E3-112EA 11300-11301 1133C 11340 11366-1136C 11370-11374 114B3-114B8
114BA 114BF-114C0 114C2-114C3 115B2-115B5 115BC-115BD 115BF-115C0 115DC-115DD 11633-1163A
1163D 1163F-11640 116AB 116AD 116B0-116B5 116B7 1171D-1171F 11722-11725
11727-1172B 16AF0-16AF4 16B30-16B36 16F8F-16F92 1BC9D-1BC9E 1D167-1D169 1D17B-1D182 1D185-1D18B
1D1AA-1D1AD 1D242-1D244 1DA00-1DA36 1DA3B-1DA6C 1DA75 1DA84 1DA9B-1DA9F 1DAA1-1DAAF
1E8D0-1E8D6 E0100-E01EF
""")

# Characters with a decomposition or a combining class that the reference's
# NFD (Unicode 9) does not know: plain starters to it.
_NFD_NEW = _ranges("""
05C8-05C9 07FD 0897-089F 08CA-08D3 09FE 0C3C 0D3B-0D3C 0EBA
1715 1ABF-1AF0 1DF6-1DFA A82C 105C9 105E4 10D24-10D27 10D69-10D6D
10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50 10F82-10F85 11070 1133B
11383 11385 1138E 11391 113C5 113C7-113C8 113CE-113D0 1145E
11839-1183A 11938 1193D-1193E 11943 119E0 11A34 11A47 11A99
11D42 11D44-11D45 11D97 11F41-11F42 16121-16128 1612F 16D68-16D6A 16FF0-16FF1
1D127-1D128 1D250-1D252 1D25B-1D25C 1D25F 1D280-1D281 1E08F 1E130-1E136 1E2AE
1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5
""")

# Lowercase pairs of Unicode 15-17 that older Pythons lack (Rust 1.9x has them).
_LOWER_PATCH = _lower_patch("""
1C89>1C8A A7CB>0264 A7CC>A7CD A7CE>A7CF A7D2>A7D3 A7D4>A7D5 A7DA>A7DB A7DC>019B 10D50-10D65>10D70 16EA0-16EB8>16EBB
""")
