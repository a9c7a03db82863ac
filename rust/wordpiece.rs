//! BERT WordPiece tokenizer with the ids of the `tokenizers` library's
//! `BertWordPieceTokenizer` (transformers' `BertTokenizerFast`).
//!
//! The pipeline, in the reference's order:
//! 1. special tokens (`[CLS]`, `[SEP]`, ...) written literally in the raw text
//!    are matched first and kept whole, as the reference's added-token pass does;
//! 2. normalizer: drop NUL, U+FFFD and "other" characters (Cc, Cf, Co; tab,
//!    newline and carriage return count as whitespace), turn whitespace into a
//!    space, put spaces around CJK ideographs, then (when stripping accents) NFD
//!    and drop non-spacing marks (Mn), then (when lowercasing) lowercase each
//!    character;
//! 3. pre-tokenizer: split on whitespace, and isolate every punctuation
//!    character (ASCII punctuation and Unicode P*);
//! 4. WordPiece: greedy longest-match-first with `##` continuations; a word
//!    longer than 100 characters, or one that cannot be covered, is `[UNK]`.
//!
//! Unicode tables: the character classes come from the same crates, at the same
//! versions, as the reference (`unicode_categories` 0.1 and
//! `unicode-normalization-alignments` 0.1, both Unicode 9 era); lowercasing is
//! Rust's `char::to_lowercase` like the reference's. Newer Unicode tables would
//! change ids: a Cf character added after Unicode 9 is kept by the reference, a
//! combining mark added later is not stripped by it, and so on.
//!
//! Speed: ASCII bytes (nearly all of English text) take a table-driven path
//! that builds each lowercased word in a reused buffer; only runs of non-ASCII
//! characters go through the Unicode pipeline. Vocabulary lookups use the word
//! bytes directly (continuations look up a second map keyed without `##`), so
//! nothing is allocated per word.

use std::sync::OnceLock;

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use unicode_categories::UnicodeCategories;
use unicode_normalization_alignments::UnicodeNormalization;

/// Longer words (in characters, after normalization) become `[UNK]`, as in the reference.
pub const MAX_INPUT_CHARS_PER_WORD: usize = 100;
/// Prefix of continuation pieces.
pub const CONTINUATION_PREFIX: &str = "##";
/// Tokens recognised verbatim in raw text (when present in the vocabulary).
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// Tokens the encoder cannot work without.
pub const REQUIRED_TOKENS: [&str; 4] = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The vocabulary lacks tokens the encoder needs (named).
    MissingTokens(Vec<&'static str>),
    /// An argument is out of range (the message says which and why).
    InvalidArgument(String),
    /// An output could not be allocated (the message says which and how big).
    OutOfMemory(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::MissingTokens(t) => {
                write!(f, "vocabulary lacks required token(s) {}", t.join(", "))
            }
            Error::InvalidArgument(m) | Error::OutOfMemory(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

// ---------------------------------------------------------------------------
// Character classes
// ---------------------------------------------------------------------------

const C_REMOVE: u8 = 1; // dropped by clean_text
const C_SPACE: u8 = 2; // whitespace: becomes ' ' and splits words
const C_CJK: u8 = 4; // gets spaces around it
const C_PUNCT: u8 = 8; // isolated by the pre-tokenizer
const C_MN: u8 = 16; // non-spacing mark, dropped when stripping accents

/// The reference's CJK ranges (note: 0x2B820..0x2B91F is not among them).
fn is_chinese_char(cp: u32) -> bool {
    matches!(cp,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B920..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

fn compute_class(c: char) -> u8 {
    let mut k = 0;
    // clean_text: tab/newline/CR are whitespace, every other Cc/Cf/Co goes.
    let whitespace = matches!(c, '\t' | '\n' | '\r') || c.is_whitespace();
    let control = !matches!(c, '\t' | '\n' | '\r') && c.is_other();
    if c == '\0' || c == '\u{FFFD}' || control {
        k |= C_REMOVE;
    } else if whitespace {
        k |= C_SPACE;
    }
    if is_chinese_char(c as u32) {
        k |= C_CJK;
    }
    if c.is_ascii_punctuation() || c.is_punctuation() {
        k |= C_PUNCT;
    }
    if c.is_mark_nonspacing() {
        k |= C_MN;
    }
    k
}

/// Classes of the Basic Multilingual Plane, computed once (64 KiB).
fn bmp_classes() -> &'static [u8] {
    static TABLE: OnceLock<Box<[u8]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0u32..0x10000)
            .map(|cp| char::from_u32(cp).map_or(0, compute_class))
            .collect::<Vec<u8>>()
            .into_boxed_slice()
    })
}

#[inline]
fn class_of(c: char, bmp: &[u8]) -> u8 {
    let cp = c as u32;
    if cp < 0x10000 {
        bmp[cp as usize]
    } else {
        compute_class(c)
    }
}

// ASCII byte classes for the fast path.
const A_WORD: u8 = 0;
const A_SPACE: u8 = 1;
const A_PUNCT: u8 = 2;
const A_REMOVE: u8 = 3;

fn ascii_class_of(b: u8) -> u8 {
    match b {
        b'\t' | b'\n' | b'\r' | b' ' => A_SPACE,
        0x00..=0x1F | 0x7F => A_REMOVE, // includes \x0b and \x0c: Cc wins over whitespace
        _ if b.is_ascii_punctuation() => A_PUNCT,
        _ => A_WORD,
    }
}

// ---------------------------------------------------------------------------
// Piece lookup table
// ---------------------------------------------------------------------------

/// The bytes of a key of at most 16 bytes as two zero-padded little-endian
/// words, read with a few overlapping loads (no per-byte loop, no memcpy call).
#[inline(always)]
fn load16(b: &[u8]) -> (u64, u64) {
    #[inline(always)]
    fn u64_at(b: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
    }
    #[inline(always)]
    fn u32_at(b: &[u8], i: usize) -> u64 {
        u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as u64
    }
    let n = b.len();
    debug_assert!(n <= 16);
    if n >= 8 {
        let hi = if n > 8 {
            u64_at(b, n - 8) >> (8 * (16 - n))
        } else {
            0
        };
        (u64_at(b, 0), hi)
    } else if n >= 4 {
        (u32_at(b, 0) | (u32_at(b, n - 4) << (8 * (n - 4))), 0)
    } else if n > 0 {
        let lo =
            b[0] as u64 | (b[n / 2] as u64) << (8 * (n / 2)) | (b[n - 1] as u64) << (8 * (n - 1));
        (lo, 0)
    } else {
        (0, 0)
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    k0: u64,
    k1: u64,
    /// key length << 32 | id; 0 marks an empty slot (lengths are stored + 1).
    meta: u64,
}

/// Open-addressing map from short byte strings (the vocabulary's pieces) to
/// ids: keys of up to 16 bytes live in the slots themselves, so a lookup is
/// a hash of two words, usually one probe and two word comparisons. Longer
/// keys (rare in BERT vocabularies) go to a plain hash map.
struct PieceMap {
    slots: Box<[Slot]>,
    shift: u32,
    long: FxHashMap<Box<[u8]>, u32>,
    max_len: usize,
}

impl PieceMap {
    fn new<'a>(entries: impl Iterator<Item = (&'a [u8], u32)> + Clone) -> Self {
        let count = entries.clone().count();
        let bits = (usize::BITS - (count.max(4) * 2 - 1).leading_zeros()).max(4); // load factor <= 1/2
        let mut map = PieceMap {
            slots: vec![Slot::default(); 1 << bits].into_boxed_slice(),
            shift: 64 - bits,
            long: FxHashMap::default(),
            max_len: 0,
        };
        for (key, id) in entries {
            map.max_len = map.max_len.max(key.len());
            if key.len() > 16 {
                map.long.insert(key.into(), id);
                continue;
            }
            let (k0, k1) = load16(key);
            let mask = map.slots.len() - 1;
            let mut i = map.index(k0, k1, key.len());
            while map.slots[i].meta != 0 {
                i = (i + 1) & mask;
            }
            map.slots[i] = Slot {
                k0,
                k1,
                meta: ((key.len() as u64 + 1) << 32) | id as u64,
            };
        }
        map
    }

    #[inline(always)]
    fn index(&self, k0: u64, k1: u64, len: usize) -> usize {
        let h = (k0 ^ k1.rotate_left(29) ^ (len as u64).rotate_left(53))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> self.shift) as usize
    }

    #[inline(always)]
    fn get(&self, key: &[u8]) -> Option<u32> {
        if key.len() > 16 {
            return if self.long.is_empty() {
                None
            } else {
                self.long.get(key).copied()
            };
        }
        let (k0, k1) = load16(key);
        let want = (key.len() as u64 + 1) << 32;
        let mask = self.slots.len() - 1;
        let mut i = self.index(k0, k1, key.len());
        loop {
            let s = &self.slots[i];
            if s.meta == 0 {
                return None;
            }
            if s.k0 == k0 && s.k1 == k1 && (s.meta & !0xFFFF_FFFF) == want {
                return Some(s.meta as u32);
            }
            i = (i + 1) & mask;
        }
    }
}

// ---------------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------------

/// Parse vocab.txt contents as the reference does: one token per line (`\n` or
/// `\r\n`), trailing whitespace trimmed, id = line number; a repeated token
/// keeps its last id.
pub fn parse_vocab(contents: &str) -> Vec<String> {
    contents.lines().map(|l| l.trim_end().to_string()).collect()
}

/// The tokenizer: vocabulary, options and lookup tables. Immutable and `Sync`.
pub struct WordPiece {
    tokens: Vec<String>,
    /// Every token (a word's first piece is looked up here).
    initial: PieceMap,
    /// Tokens starting with `##`, keyed without it (later pieces).
    continuation: PieceMap,
    lowercase: bool,
    strip_accents: bool,
    unk: u32,
    cls: u32,
    sep: u32,
    pad: u32,
    mask: Option<u32>,
    specials: Vec<(Box<[u8]>, u32)>,
    ascii_class: [u8; 128],
    ascii_map: [u8; 128],
    ascii_punct_id: [u32; 128],
}

/// Per-thread reusable buffers.
#[derive(Default)]
pub struct Scratch {
    word: Vec<u8>,
    nchars: usize,
    chars: Vec<char>,
    chars2: Vec<char>,
}

/// Options of a batch encoding.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Upper bound on row length (with special tokens) when `truncation`;
    /// the padded width when `pad_to_max_length`.
    pub max_length: Option<usize>,
    pub truncation: bool,
    /// Pad every row to `max_length` (else to the longest row).
    pub pad_to_max_length: bool,
}

/// Three row-major (rows x cols) int64 matrices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub cols: usize,
    pub input_ids: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
}

impl WordPiece {
    /// Build from the tokens of vocab.txt (see `parse_vocab`).
    /// `strip_accents: None` follows `lowercase`, as in the reference.
    pub fn new(
        tokens: Vec<String>,
        lowercase: bool,
        strip_accents: Option<bool>,
    ) -> Result<Self, Error> {
        let mut initial: FxHashMap<Box<[u8]>, u32> = FxHashMap::default();
        let mut continuation: FxHashMap<Box<[u8]>, u32> = FxHashMap::default();
        initial.reserve(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| {
                Error::InvalidArgument("vocabulary has more than 2^32 tokens".into())
            })?;
            initial.insert(tok.as_bytes().into(), id);
            if let Some(rest) = tok.strip_prefix(CONTINUATION_PREFIX) {
                continuation.insert(rest.as_bytes().into(), id);
            }
        }
        let get = |t: &str| initial.get(t.as_bytes()).copied();
        let missing: Vec<&'static str> = REQUIRED_TOKENS
            .iter()
            .copied()
            .filter(|t| get(t).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingTokens(missing));
        }
        let unk = get("[UNK]").unwrap_or_default();
        let specials = SPECIAL_TOKENS
            .iter()
            .filter_map(|t| get(t).map(|id| (Box::<[u8]>::from(t.as_bytes()), id)))
            .collect();
        let mut ascii_class = [0u8; 128];
        let mut ascii_map = [0u8; 128];
        let mut ascii_punct_id = [unk; 128];
        for b in 0..128u8 {
            ascii_class[b as usize] = ascii_class_of(b);
            ascii_map[b as usize] = if lowercase { b.to_ascii_lowercase() } else { b };
            if let Some(id) = initial.get(&[b][..]) {
                ascii_punct_id[b as usize] = *id;
            }
        }
        Ok(WordPiece {
            unk,
            cls: get("[CLS]").unwrap_or_default(),
            sep: get("[SEP]").unwrap_or_default(),
            pad: get("[PAD]").unwrap_or_default(),
            mask: get("[MASK]"),
            tokens,
            initial: PieceMap::new(initial.iter().map(|(k, &v)| (&k[..], v))),
            continuation: PieceMap::new(continuation.iter().map(|(k, &v)| (&k[..], v))),
            lowercase,
            strip_accents: strip_accents.unwrap_or(lowercase),
            specials,
            ascii_class,
            ascii_map,
            ascii_punct_id,
        })
    }

    /// Build from the contents of a vocab.txt file.
    pub fn from_vocab_text(
        contents: &str,
        lowercase: bool,
        strip_accents: Option<bool>,
    ) -> Result<Self, Error> {
        Self::new(parse_vocab(contents), lowercase, strip_accents)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
    pub fn lowercase(&self) -> bool {
        self.lowercase
    }
    pub fn strip_accents(&self) -> bool {
        self.strip_accents
    }
    pub fn unk_id(&self) -> u32 {
        self.unk
    }
    pub fn cls_id(&self) -> u32 {
        self.cls
    }
    pub fn sep_id(&self) -> u32 {
        self.sep
    }
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn mask_id(&self) -> Option<u32> {
        self.mask
    }
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.initial.get(token.as_bytes())
    }

    // ---- WordPiece on one normalized word ---------------------------------

    /// Greedy longest-match-first over the bytes of one normalized word.
    fn word_to_ids(&self, word: &[u8], nchars: usize, out: &mut Vec<u32>) {
        if nchars > MAX_INPUT_CHARS_PER_WORD {
            out.push(self.unk);
            return;
        }
        if let Some(id) = self.initial.get(word) {
            out.push(id); // the common case: the whole word is a token
            return;
        }
        let mark = out.len();
        let mut start = 0;
        while start < word.len() {
            let map = if start == 0 {
                &self.initial
            } else {
                &self.continuation
            };
            let max_len = map.max_len;
            // No token is longer than max_len bytes: start there, on a char boundary.
            let mut end = word.len().min(start + max_len);
            while end > start && !is_boundary(word, end) {
                end -= 1;
            }
            let mut found = None;
            while end > start {
                if let Some(id) = map.get(&word[start..end]) {
                    found = Some(id);
                    break;
                }
                end -= 1;
                while end > start && !is_boundary(word, end) {
                    end -= 1;
                }
            }
            match found {
                Some(id) => {
                    out.push(id);
                    start = end;
                }
                None => {
                    out.truncate(mark);
                    out.push(self.unk);
                    return;
                }
            }
        }
    }

    // ---- normalizer + pre-tokenizer, fused -------------------------------

    #[inline]
    fn flush<S: Sink>(&self, s: &mut Scratch, sink: &mut S) {
        if !s.word.is_empty() {
            sink.word(self, &s.word, s.nchars);
            s.word.clear();
            s.nchars = 0;
        }
    }

    /// Pre-tokenize one normalized character.
    #[inline]
    fn feed<S: Sink>(&self, c: char, bmp: &[u8], s: &mut Scratch, sink: &mut S) {
        let mut buf = [0u8; 4];
        if c.is_whitespace() {
            self.flush(s, sink);
        } else if class_of(c, bmp) & C_PUNCT != 0 {
            self.flush(s, sink);
            sink.word(self, c.encode_utf8(&mut buf).as_bytes(), 1);
        } else {
            s.word.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            s.nchars += 1;
        }
    }

    /// Normalize and pre-tokenize a run of non-ASCII characters. ASCII
    /// characters are starters that never decompose, so the NFD of a text is
    /// the concatenation of the NFD of such runs and the ASCII between them.
    fn unicode_run<S: Sink>(&self, run: &str, bmp: &[u8], s: &mut Scratch, sink: &mut S) {
        let mut chars = std::mem::take(&mut s.chars);
        chars.clear();
        for c in run.chars() {
            let k = class_of(c, bmp);
            if k & C_REMOVE != 0 {
                continue;
            }
            if k & C_SPACE != 0 {
                chars.push(' ');
            } else if k & C_CJK != 0 {
                chars.extend_from_slice(&[' ', c, ' ']);
            } else {
                chars.push(c);
            }
        }
        if self.strip_accents {
            let mut stripped = std::mem::take(&mut s.chars2);
            stripped.clear();
            stripped.extend(
                chars
                    .iter()
                    .copied()
                    .nfd()
                    .map(|(c, _)| c)
                    .filter(|&c| class_of(c, bmp) & C_MN == 0),
            );
            s.chars2 = std::mem::replace(&mut chars, stripped);
        }
        for &c in &chars {
            if !self.lowercase {
                self.feed(c, bmp, s, sink);
            } else if c.is_ascii() {
                self.feed(c.to_ascii_lowercase(), bmp, s, sink);
            } else {
                for l in c.to_lowercase() {
                    self.feed(l, bmp, s, sink);
                }
            }
        }
        s.chars = chars;
    }

    /// Run the whole pipeline over `text`, handing each word to `sink`.
    fn run<S: Sink>(&self, text: &str, s: &mut Scratch, sink: &mut S) {
        let bmp = bmp_classes();
        let bytes = text.as_bytes();
        s.word.clear();
        s.nchars = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b < 0x80 {
                match self.ascii_class[b as usize] {
                    A_WORD => {
                        s.word.push(self.ascii_map[b as usize]);
                        s.nchars += 1;
                    }
                    A_SPACE => self.flush(s, sink),
                    A_PUNCT => {
                        self.flush(s, sink);
                        if b == b'[' {
                            if let Some((tok, id)) = self
                                .specials
                                .iter()
                                .find(|(t, _)| bytes[i..].starts_with(t))
                            {
                                sink.special(tok, *id);
                                i += tok.len();
                                continue;
                            }
                        }
                        sink.ascii_punct(self, b);
                    }
                    _ => {} // a dropped control character does not split the word
                }
                i += 1;
            } else {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] >= 0x80 {
                    i += 1;
                }
                // `start..i` holds whole multi-byte characters: it starts at a
                // lead byte and stops before an ASCII byte (or the end).
                self.unicode_run(&text[start..i], bmp, s, sink);
            }
        }
        self.flush(s, sink);
    }

    // ---- public encoders --------------------------------------------------

    /// Append the ids of `text` (no special tokens added) to `out`.
    pub fn encode_into(&self, text: &str, s: &mut Scratch, out: &mut Vec<u32>) {
        self.run(text, s, &mut IdSink(out));
    }

    /// The ids of `text` without special tokens.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_into(text, &mut Scratch::default(), &mut out);
        out
    }

    /// The tokens of `text` without special tokens.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        self.encode_text(text)
            .into_iter()
            .map(|id| self.tokens[id as usize].clone())
            .collect()
    }

    /// The normalized, pre-tokenized words of `text` (the input of WordPiece;
    /// special tokens written in the text appear whole). For tests and debugging.
    pub fn words(&self, text: &str) -> Vec<String> {
        let mut sink = WordSink(Vec::new());
        self.run(text, &mut Scratch::default(), &mut sink);
        sink.0
    }

    /// `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, truncated longest-first to
    /// `max_length` ids when given.
    pub fn encode(
        &self,
        a: &str,
        b: Option<&str>,
        max_length: Option<usize>,
    ) -> Result<(Vec<u32>, Vec<u32>), Error> {
        check_max_length(max_length, b.is_some())?;
        let mut s = Scratch::default();
        let mut ia = Vec::new();
        let mut ib = Vec::new();
        self.encode_into(a, &mut s, &mut ia);
        if let Some(b) = b {
            self.encode_into(b, &mut s, &mut ib);
        }
        if let Some(ml) = max_length {
            let (na, nb) = truncated_lengths(ia.len(), ib.len(), ml, b.is_some());
            ia.truncate(na);
            ib.truncate(nb);
        }
        let mut ids = Vec::with_capacity(ia.len() + ib.len() + 3);
        let mut types = Vec::with_capacity(ids.capacity());
        ids.push(self.cls);
        ids.extend_from_slice(&ia);
        ids.push(self.sep);
        types.resize(ids.len(), 0);
        if b.is_some() {
            ids.extend_from_slice(&ib);
            ids.push(self.sep);
            types.resize(ids.len(), 1);
        }
        Ok((ids, types))
    }

    /// Encode rows (`texts[i]`, or the pair (`texts[i]`, `pairs[i]`)) with
    /// special tokens, truncation and padding, on `threads` threads (0 = the
    /// default count; see `crate::pool`).
    pub fn encode_batch(
        &self,
        texts: &[&str],
        pairs: Option<&[&str]>,
        opts: BatchOptions,
        threads: usize,
    ) -> Result<Batch, Error> {
        let is_pair = pairs.is_some();
        if let Some(p) = pairs {
            if p.len() != texts.len() {
                return Err(Error::InvalidArgument(format!(
                    "texts and pairs differ in length ({} and {})",
                    texts.len(),
                    p.len()
                )));
            }
        }
        if opts.pad_to_max_length && opts.max_length.is_none() {
            return Err(Error::InvalidArgument(
                "padding to max_length needs a max_length".into(),
            ));
        }
        let trunc = if opts.truncation {
            opts.max_length
        } else {
            None
        };
        check_max_length(trunc, is_pair)?;

        // Phase 1: token ids of each row, in chunks of rows (one arena per chunk).
        let n = texts.len();
        let threads =
            crate::pool::checked_threads(threads, "num_threads").map_err(Error::InvalidArgument)?;
        let chunk = (n / (threads * 8).max(1)).clamp(16, 2048);
        let encode_chunk = |lo: usize, s: &mut Scratch| -> Chunk {
            let hi = (lo + chunk).min(n);
            let mut c = Chunk {
                ids: Vec::with_capacity((hi - lo) * 32),
                rows: Vec::with_capacity(hi - lo),
            };
            let mut tmp = Vec::new();
            for r in lo..hi {
                let start = c.ids.len();
                self.encode_into(texts[r], s, &mut c.ids);
                let mut na = c.ids.len() - start;
                let mut nb = 0;
                if let Some(p) = pairs {
                    tmp.clear();
                    self.encode_into(p[r], s, &mut tmp);
                    nb = tmp.len();
                    if let Some(ml) = trunc {
                        let (ta, tb) = truncated_lengths(na, nb, ml, true);
                        c.ids.truncate(start + ta);
                        na = ta;
                        nb = tb;
                    }
                    c.ids.extend_from_slice(&tmp[..nb]);
                } else if let Some(ml) = trunc {
                    na = truncated_lengths(na, 0, ml, false).0;
                    c.ids.truncate(start + na);
                }
                c.rows.push((start, na, nb));
            }
            c
        };
        let starts: Vec<usize> = (0..n).step_by(chunk).collect();
        let run_phase1 = || -> Vec<Chunk> {
            if threads == 1 {
                let mut s = Scratch::default();
                starts.iter().map(|&lo| encode_chunk(lo, &mut s)).collect()
            } else {
                starts
                    .par_iter()
                    .map_init(Scratch::default, |s, &lo| encode_chunk(lo, s))
                    .collect()
            }
        };
        let pool = if threads == 1 {
            None
        } else {
            Some(crate::pool::pool(threads))
        };
        let chunks = match &pool {
            Some(p) => p.install(run_phase1),
            None => run_phase1(),
        };

        // Phase 2: width, then fill the three matrices row by row.
        let extra = if is_pair { 3 } else { 2 };
        let longest = chunks
            .iter()
            .flat_map(|c| c.rows.iter())
            .map(|&(_, na, nb)| na + nb + extra)
            .max()
            .unwrap_or(0);
        let cols = match opts.max_length {
            Some(ml) if opts.pad_to_max_length => ml.max(longest),
            _ => longest,
        };
        // The width comes from the caller's max_length: check the size against the
        // machine's memory (an allocation the OS accepts lazily could still be killed
        // when filled), then allocate fallibly.
        let too_big = || {
            Error::OutOfMemory(format!(
                "cannot allocate the batch: 3 int64 arrays of {n} x {cols} values"
            ))
        };
        let total = n.checked_mul(cols).ok_or_else(too_big)?;
        let bytes = (total as u64).saturating_mul(3 * 8);
        if let Some(memory) = physical_memory() {
            if bytes > memory {
                return Err(Error::OutOfMemory(format!(
                    "cannot allocate the batch: 3 int64 arrays of {n} x {cols} values need \
                     {:.1} GiB, more than this machine's {:.1} GiB of memory",
                    bytes as f64 / GIB,
                    memory as f64 / GIB
                )));
            }
        }
        // Zeroed pages come from the OS already zero (like `vec![0; n]`): no pass that writes
        // every byte, which would cost as much as the encoding itself.
        let filled = |value: i64| -> Result<Vec<i64>, Error> {
            let mut v = zeroed_vec(total).ok_or_else(too_big)?;
            if value != 0 {
                v.fill(value);
            }
            Ok(v)
        };
        let mut batch = Batch {
            rows: n,
            cols,
            input_ids: filled(self.pad as i64)?,
            token_type_ids: filled(0)?,
            attention_mask: filled(0)?,
        };
        if cols == 0 {
            return Ok(batch);
        }
        let (cls, sep) = (self.cls as i64, self.sep as i64);
        let fill = |c: &Chunk, ids: &mut [i64], types: &mut [i64], mask: &mut [i64]| {
            for (k, &(start, na, nb)) in c.rows.iter().enumerate() {
                let row = k * cols..(k + 1) * cols;
                let (ids, types, mask) = (
                    &mut ids[row.clone()],
                    &mut types[row.clone()],
                    &mut mask[row],
                );
                ids[0] = cls;
                for (d, &v) in ids[1..1 + na].iter_mut().zip(&c.ids[start..start + na]) {
                    *d = v as i64;
                }
                ids[1 + na] = sep;
                let mut len = 2 + na;
                if is_pair {
                    for (d, &v) in ids[len..len + nb]
                        .iter_mut()
                        .zip(&c.ids[start + na..start + na + nb])
                    {
                        *d = v as i64;
                    }
                    ids[len + nb] = sep;
                    types[len..len + nb + 1].fill(1);
                    len += nb + 1;
                }
                mask[..len].fill(1);
            }
        };
        // Split the outputs into the row ranges of the chunks.
        let mut parts = Vec::with_capacity(chunks.len());
        let (mut ids, mut types, mut mask) = (
            &mut batch.input_ids[..],
            &mut batch.token_type_ids[..],
            &mut batch.attention_mask[..],
        );
        for c in &chunks {
            let len = c.rows.len() * cols;
            let (a, ra) = std::mem::take(&mut ids).split_at_mut(len);
            let (b, rb) = std::mem::take(&mut types).split_at_mut(len);
            let (m, rm) = std::mem::take(&mut mask).split_at_mut(len);
            parts.push((c, a, b, m));
            (ids, types, mask) = (ra, rb, rm);
        }
        match &pool {
            Some(p) => p.install(|| {
                parts
                    .into_par_iter()
                    .for_each(|(c, a, b, m)| fill(c, a, b, m))
            }),
            None => parts.into_iter().for_each(|(c, a, b, m)| fill(c, a, b, m)),
        }
        Ok(batch)
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// `len` zeros, allocated zeroed and fallibly: None when the allocator refuses.
fn zeroed_vec(len: usize) -> Option<Vec<i64>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<i64>(len).ok()?;
    // SAFETY: `layout` has a non-zero size. A non-null result of `alloc_zeroed` is valid for
    // `len` i64 values, all zero (a valid i64), and was allocated by the global allocator with
    // exactly the layout `Vec<i64>` of capacity `len` uses, as `Vec::from_raw_parts` requires.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut i64;
        if ptr.is_null() {
            return None;
        }
        Some(Vec::from_raw_parts(ptr, len, len))
    }
}

/// Total physical memory in bytes, where the OS says (Linux: /proc/meminfo).
fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The rows of one chunk: ids of both segments back to back, and per row
/// (offset, length of a, length of b) after truncation.
struct Chunk {
    ids: Vec<u32>,
    rows: Vec<(usize, usize, usize)>,
}

fn check_max_length(max_length: Option<usize>, is_pair: bool) -> Result<(), Error> {
    let need = if is_pair { 3 } else { 2 };
    match max_length {
        Some(ml) if ml < need => Err(Error::InvalidArgument(format!(
            "max_length={ml} leaves no room for the {need} special tokens of a {}",
            if is_pair { "pair" } else { "single sentence" }
        ))),
        _ => Ok(()),
    }
}

/// Lengths of the two segments after truncating a row to `max_length` ids
/// (special tokens included), longest-first exactly as the reference does:
/// if the shorter segment fits in half, the longer one gets the rest;
/// otherwise both get half, the longer (the second on a tie) the odd one.
pub fn truncated_lengths(na: usize, nb: usize, max_length: usize, is_pair: bool) -> (usize, usize) {
    let target = max_length.saturating_sub(if is_pair { 3 } else { 2 });
    if !is_pair {
        return (na.min(target), 0);
    }
    if na + nb <= target {
        return (na, nb);
    }
    // The reference's code, with n1 the shorter length.
    let swap = na > nb;
    let mut n1 = na.min(nb);
    let mut n2 = if n1 > target { n1 } else { n1.max(target - n1) };
    if n1 + n2 > target {
        n1 = target / 2;
        n2 = n1 + target % 2;
    }
    let (ka, kb) = if swap { (n2, n1) } else { (n1, n2) };
    (ka.min(na), kb.min(nb))
}

/// Receives the words found by the pipeline.
trait Sink {
    fn word(&mut self, wp: &WordPiece, word: &[u8], nchars: usize);
    fn special(&mut self, token: &[u8], id: u32);
    fn ascii_punct(&mut self, wp: &WordPiece, b: u8) {
        self.word(wp, &[b], 1);
    }
}

/// Runs WordPiece on each word and appends the ids.
struct IdSink<'a>(&'a mut Vec<u32>);

impl Sink for IdSink<'_> {
    #[inline]
    fn word(&mut self, wp: &WordPiece, word: &[u8], nchars: usize) {
        wp.word_to_ids(word, nchars, self.0);
    }
    #[inline]
    fn special(&mut self, _token: &[u8], id: u32) {
        self.0.push(id);
    }
    #[inline]
    fn ascii_punct(&mut self, wp: &WordPiece, b: u8) {
        self.0.push(wp.ascii_punct_id[b as usize]);
    }
}

/// Collects the words themselves.
struct WordSink(Vec<String>);

impl Sink for WordSink {
    fn word(&mut self, _wp: &WordPiece, word: &[u8], _nchars: usize) {
        self.0.push(String::from_utf8_lossy(word).into_owned());
    }
    fn special(&mut self, token: &[u8], _id: u32) {
        self.0.push(String::from_utf8_lossy(token).into_owned());
    }
}

#[inline]
fn is_boundary(word: &[u8], i: usize) -> bool {
    i >= word.len() || (word[i] & 0xC0) != 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nun\n##aff\n##able\nhello\nworld\n,\n!\n[\n]\na\n##b\n中\ne\n##e\ncafe\n##s\nb\n";

    fn wp() -> WordPiece {
        WordPiece::from_vocab_text(VOCAB, true, None).unwrap()
    }

    fn toks(w: &WordPiece, text: &str) -> Vec<String> {
        w.tokenize(text)
    }

    #[test]
    fn basic_words_and_punctuation() {
        assert_eq!(toks(&wp(), "Hello, WORLD!"), ["hello", ",", "world", "!"]);
        assert_eq!(toks(&wp(), "  hello\t\nworld  "), ["hello", "world"]);
        assert!(toks(&wp(), "").is_empty());
        assert!(toks(&wp(), " \t\r\n\u{3000}").is_empty());
    }

    #[test]
    fn greedy_longest_match_and_unk() {
        assert_eq!(toks(&wp(), "unaffable"), ["un", "##aff", "##able"]);
        assert_eq!(toks(&wp(), "abbb"), ["a", "##b", "##b", "##b"]);
        // One piece that cannot be matched makes the whole word [UNK].
        assert_eq!(toks(&wp(), "unaffablex hello"), ["[UNK]", "hello"]);
    }

    #[test]
    fn long_words_are_unk() {
        let w =
            WordPiece::from_vocab_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n##a\n", true, None).unwrap();
        assert_eq!(w.encode_text(&"a".repeat(100)).len(), 100);
        assert_eq!(w.tokenize(&"a".repeat(101)), ["[UNK]"]);
        // The limit counts characters after normalization (NFD grows "á" to two).
        assert_eq!(w.tokenize(&"á".repeat(60)).len(), 60);
    }

    #[test]
    fn normalizer() {
        let w = wp();
        assert_eq!(w.words("Café"), ["cafe"]);
        assert_eq!(w.words("cafe\u{301}s"), ["cafes"]);
        assert_eq!(w.words("a中b"), ["a", "中", "b"]);
        assert_eq!(
            w.words("hel\u{0}lo hel\u{200B}lo hel\u{FFFD}lo hel\u{7}lo"),
            ["hello"; 4]
        );
        assert_eq!(w.words("a\u{a0}b\u{2028}c\u{85}d\u{b}e"), ["a", "b", "cde"]);
        assert_eq!(w.words("a\u{a0}b\u{2028}c\u{85}d"), ["a", "b", "cd"]);
        assert_eq!(w.words("x\u{b}y\u{c}z"), ["xyz"]);
        assert_eq!(w.words("«hi»—x"), ["«", "hi", "»", "—", "x"]);
        assert_eq!(w.words("$5+3^2"), ["$", "5", "+", "3", "^", "2"]);
        assert_eq!(w.words("\u{212A}elvin İ"), ["kelvin", "i"]);
        // Compatibility ideographs decompose to unified ones, spaced apart.
        assert_eq!(w.words("x\u{F900}y"), ["x", "\u{8C48}", "y"]);
        // Not in the reference's CJK ranges: stays inside the word.
        assert_eq!(w.words("x\u{2B820}y"), ["x\u{2B820}y"]);
    }

    #[test]
    fn cased_mode() {
        let w = WordPiece::from_vocab_text(VOCAB, false, None).unwrap();
        assert!(!w.strip_accents());
        assert_eq!(w.words("Café İ"), ["Café", "İ"]);
        let w = WordPiece::from_vocab_text(VOCAB, false, Some(true)).unwrap();
        assert_eq!(w.words("Café"), ["Cafe"]);
        let w = WordPiece::from_vocab_text(VOCAB, true, Some(false)).unwrap();
        assert_eq!(w.words("Café İ"), ["café", "i\u{307}"]);
    }

    #[test]
    fn nfd_reorders_marks_before_stripping() {
        // U+1D16D (ccc 226) before U+1D165 (ccc 216): both are Mc, so they
        // survive stripping, in canonical order.
        let w = wp();
        assert_eq!(w.words("x\u{1D16D}\u{1D165}"), ["x\u{1D165}\u{1D16D}"]);
        let cased = WordPiece::from_vocab_text(VOCAB, false, None).unwrap();
        assert_eq!(cased.words("x\u{1D16D}\u{1D165}"), ["x\u{1D16D}\u{1D165}"]);
    }

    #[test]
    fn special_tokens_in_text_are_kept_whole() {
        let w = wp();
        assert_eq!(
            toks(&w, "hello[SEP]world [MASK]"),
            ["hello", "[SEP]", "world", "[MASK]"]
        );
        assert_eq!(toks(&w, "[sep]"), ["[", "[UNK]", "]"]);
        assert_eq!(w.words("a[CLS]b"), ["a", "[CLS]", "b"]);
    }

    #[test]
    fn piece_map_finds_exactly_its_keys() {
        // Keys of every length up to 20 (past the 16-byte inline limit), with
        // zero bytes and high bytes, plus every proper prefix as a non-key.
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for len in 0..=20u8 {
            keys.push(
                (0..len)
                    .map(|i| i.wrapping_mul(37).wrapping_add(len))
                    .collect(),
            );
            keys.push(
                (0..len)
                    .map(|i| if i % 3 == 0 { 0 } else { 200 + i })
                    .collect(),
            );
            keys.push(vec![b'a'; len as usize]);
        }
        keys.sort();
        keys.dedup();
        let map = PieceMap::new(keys.iter().enumerate().map(|(i, k)| (&k[..], i as u32)));
        assert_eq!(map.max_len, 20);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.get(k), Some(i as u32), "{k:?}");
            let mut other = k.clone();
            other.push(7);
            assert_eq!(
                map.get(&other),
                keys.binary_search(&other).ok().map(|j| j as u32)
            );
        }
        // Same bytes, different lengths (trailing zeros) are different keys.
        let z = PieceMap::new([(&b"a"[..], 1), (&b"a\0"[..], 2)].into_iter());
        assert_eq!(
            (z.get(b"a"), z.get(b"a\0"), z.get(b"a\0\0")),
            (Some(1), Some(2), None)
        );
    }

    #[test]
    fn load16_reads_exactly_the_key_bytes() {
        let buf: Vec<u8> = (1..=32).collect();
        for start in 0..8 {
            for len in 0..=16 {
                let key = &buf[start..start + len];
                let mut want = [0u8; 16];
                want[..len].copy_from_slice(key);
                let (lo, hi) = load16(key);
                assert_eq!(
                    lo,
                    u64::from_le_bytes(want[..8].try_into().unwrap()),
                    "{start} {len}"
                );
                assert_eq!(
                    hi,
                    u64::from_le_bytes(want[8..].try_into().unwrap()),
                    "{start} {len}"
                );
            }
        }
    }

    #[test]
    fn vocab_parsing_and_errors() {
        let w = WordPiece::from_vocab_text("[PAD]\r\n[UNK]  \n[CLS]\n[SEP]\nx\nx\n", true, None)
            .unwrap();
        assert_eq!(w.vocab_size(), 6);
        assert_eq!(w.token_to_id("[UNK]"), Some(1));
        assert_eq!(w.token_to_id("x"), Some(5)); // the last of a repeated token
        assert_eq!(w.id_to_token(4), Some("x"));
        assert_eq!(w.mask_id(), None);
        match WordPiece::from_vocab_text("[PAD]\n[CLS]\nx\n", true, None) {
            Err(Error::MissingTokens(m)) => assert_eq!(m, ["[UNK]", "[SEP]"]),
            _ => panic!("expected MissingTokens"),
        }
    }

    #[test]
    fn truncation_matches_the_reference() {
        // (len a, len b, max_length) -> kept, measured with the reference.
        let cases = [
            ((10, 10, 11), (4, 4)),
            ((10, 10, 12), (4, 5)),
            ((11, 10, 12), (5, 4)),
            ((10, 11, 12), (4, 5)),
            ((20, 3, 10), (4, 3)),
            ((3, 20, 10), (3, 4)),
            ((3, 20, 5), (1, 1)),
            ((1, 1, 3), (0, 0)),
            ((5, 5, 4), (0, 1)),
            ((10, 1, 3), (0, 0)),
            ((7, 8, 16), (6, 7)),
            ((8, 7, 16), (7, 6)),
            ((100, 1, 13), (9, 1)),
            ((2, 3, 128), (2, 3)),
        ];
        for ((a, b, ml), want) in cases {
            assert_eq!(truncated_lengths(a, b, ml, true), want, "{a} {b} {ml}");
        }
        assert_eq!(truncated_lengths(10, 0, 5, false), (3, 0));
        assert_eq!(truncated_lengths(2, 0, 5, false), (2, 0));
    }

    #[test]
    fn encode_single_and_pair() {
        let w = wp();
        let (ids, types) = w.encode("hello world", None, None).unwrap();
        assert_eq!(ids, [2, 8, 9, 3]);
        assert_eq!(types, [0; 4]);
        let (ids, types) = w.encode("hello", Some("world !"), None).unwrap();
        assert_eq!(ids, [2, 8, 3, 9, 11, 3]);
        assert_eq!(types, [0, 0, 0, 1, 1, 1]);
        let (ids, _) = w.encode("hello world", Some("world"), Some(5)).unwrap();
        assert_eq!(ids, [2, 8, 3, 9, 3]);
        assert!(w.encode("x", Some("y"), Some(2)).is_err());
        assert!(w.encode("x", None, Some(1)).is_err());
        assert_eq!(w.encode("", Some(""), None).unwrap().0, [2, 3, 3]);
    }

    #[test]
    fn batch_matches_single_encodes_for_every_thread_count() {
        let w = wp();
        let texts: Vec<String> = (0..300)
            .map(|i| "hello world ".repeat(i % 7) + "unaffable")
            .collect();
        let pairs: Vec<String> = (0..300).map(|i| "a b ".repeat(i % 5)).collect();
        let t: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let p: Vec<&str> = pairs.iter().map(|s| s.as_str()).collect();
        for (pairs, max_length, pad) in [
            (None, None, false),
            (Some(&p[..]), Some(9), false),
            (Some(&p[..]), Some(40), true),
        ] {
            let opts = BatchOptions {
                max_length,
                truncation: true,
                pad_to_max_length: pad,
            };
            let one = w.encode_batch(&t, pairs, opts, 1).unwrap();
            let two = w.encode_batch(&t, pairs, opts, 2).unwrap();
            assert_eq!(one, two);
            assert_eq!(one.rows, 300);
            if pad {
                assert_eq!(one.cols, 40);
            }
            for r in 0..300 {
                let (ids, types) = w.encode(t[r], pairs.map(|p| p[r]), max_length).unwrap();
                let row = &one.input_ids[r * one.cols..(r + 1) * one.cols];
                assert_eq!(
                    &row[..ids.len()],
                    ids.iter().map(|&x| x as i64).collect::<Vec<_>>()
                );
                assert!(row[ids.len()..].iter().all(|&x| x == 0));
                let trow = &one.token_type_ids[r * one.cols..(r + 1) * one.cols];
                assert_eq!(
                    &trow[..ids.len()],
                    types.iter().map(|&x| x as i64).collect::<Vec<_>>()
                );
                let mrow = &one.attention_mask[r * one.cols..(r + 1) * one.cols];
                assert_eq!(mrow.iter().sum::<i64>(), ids.len() as i64);
            }
        }
        let empty = w
            .encode_batch(
                &[],
                None,
                BatchOptions {
                    max_length: None,
                    truncation: true,
                    pad_to_max_length: false,
                },
                2,
            )
            .unwrap();
        assert_eq!((empty.rows, empty.cols), (0, 0));
        assert!(w
            .encode_batch(
                &t,
                Some(&p[..3]),
                BatchOptions {
                    max_length: None,
                    truncation: true,
                    pad_to_max_length: false
                },
                2
            )
            .is_err());
    }

    #[test]
    fn callers_numbers_give_errors_not_aborts() {
        let w = wp();
        let opts = |max_length, pad| BatchOptions {
            max_length: Some(max_length),
            truncation: true,
            pad_to_max_length: pad,
        };
        // Padding one row to 2^40 ids (8 TiB per array), more than the machine's memory
        // (which the OS might accept lazily), or an overflowing n x cols.
        let beyond_memory = physical_memory().map_or(1 << 40, |m| (m / 16) as usize);
        for ml in [1usize << 40, beyond_memory, usize::MAX] {
            let err = w
                .encode_batch(&["hello"], None, opts(ml, true), 1)
                .unwrap_err();
            assert!(matches!(err, Error::OutOfMemory(_)), "{err:?}");
            assert!(err.to_string().contains("cannot allocate"), "{err}");
        }
        let rows = vec!["hello"; 3];
        let err = w
            .encode_batch(&rows, None, opts(usize::MAX / 2, true), 1)
            .unwrap_err();
        assert!(matches!(err, Error::OutOfMemory(_)), "{err:?}");
        // A huge max_length without padding only bounds truncation: fine.
        let b = w
            .encode_batch(&["hello"], None, opts(usize::MAX, false), 1)
            .unwrap();
        assert_eq!((b.rows, b.cols), (1, 3));
        assert_eq!(
            w.encode("hello", None, Some(usize::MAX)).unwrap().0.len(),
            3
        );
        // Thread counts are bounded.
        let err = w
            .encode_batch(&["hello"], None, opts(8, false), 100_000)
            .unwrap_err();
        assert!(
            err.to_string().contains("num_threads must be at most"),
            "{err}"
        );
        assert!(w
            .encode_batch(&["hello"], None, opts(8, false), crate::pool::MAX_THREADS)
            .is_ok());
    }
}
