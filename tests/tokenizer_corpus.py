"""Strings on which tokenizer rebuilds go wrong: whitespace runs, code, digits, emoji, CJK,
combining marks (NFC), contractions, control-token text, invalid-looking byte sequences."""
from __future__ import annotations

TRICKY = [
    "", " ", "  ", "\t", "\n", "\n\n\n", " \n \n", "\r\n", "   leading", "trailing   ", "a  b   c    d",
    "def f(x):\n    return x  # two spaces\n\tif x:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
    "x=1;y=22;z=333;w=4444;v=55555;u=1234567890",
    "3.14159 2,718 1e-10 0xFF 0b1010 1_000_000",
    "I'm you're he's we've they'll she'd IT'S DON'T",
    "😀 😃😄 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽",
    "東京は日本の首都です。中文测试，标点符号！한국어 텍스트",
    "Über naïve café résumé — “quotes” ‘single’ … ¿qué? ¡sí!",
    "e\u0301 vs \u00e9 (combining acute vs precomposed)",
    "Ａｌｌ ｗｉｄｅ ＡＳＣＩＩ ①②③ ℌ𝔢𝔩𝔩𝔬",
    "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>text", "<|im_start|> spaced <|im_end|>", "<|not_a_token|>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>", "<tool_call>{\"a\": 1}</tool_call>",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "\u200b\u200d\ufeff zero-width and BOM", "\x00\x01\x7f control bytes",
    "ĠĠ Ċ Ġhello (byte-level symbols as text)",
    "    " * 20 + "deep indent",
    "!!!???...---___***", "$$\\frac{a}{b}$$ \\begin{align} x &= y \\\\ \\end{align}",
]


def tokenizer_disagreements(a, b, texts=TRICKY) -> list:
    """(text, ids_a, ids_b) for every text two `tokenizers` Tokenizers encode differently
    (without added BOS/EOS), or decode back differently."""
    bad = []
    for text in texts:
        ia = a.encode(text, add_special_tokens=False).ids
        ib = b.encode(text, add_special_tokens=False).ids
        if ia != ib or a.decode(ia, skip_special_tokens=False) != b.decode(ib, skip_special_tokens=False):
            bad.append((text, ia, ib))
    return bad
