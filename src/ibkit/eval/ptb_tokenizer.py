"""PTB tokenisation as pycocoevalcap does it, in pure Python (no Java at run time).

pycocoevalcap's ``PTBTokenizer`` pipes every caption, one per line, through Stanford CoreNLP 3.4.1's
``edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` (a JFlex lexer with the PTB3
escaping defaults) and then drops the punctuation tokens in :data:`PUNCTUATIONS`. CIDEr and BLEU scores
depend on that exact tokenisation, so this module re-creates the lexer: an ordered list of rules, each a
regular expression with an optional trailing context, applied with JFlex semantics (at every position the
rule whose match, trailing context included, is longest wins; ties go to the earlier rule; some actions
hand characters back to the input).

The rules were reconstructed from the CoreNLP lexer's documented rule set and behaviour, then checked
token by token against the 3.4.1 jar: on caption-like text (case, punctuation, quotes, apostrophes,
hyphens, numbers, brackets, abbreviations, accented letters, curly quotes and dashes) and on random
character soups with URLs, e-mail addresses, phone numbers, SGML tags, entities and assorted Unicode
(about 200k lines, no difference). One deliberate difference: a line break inside a caption other
than ``\n`` (``\r``, U+2028, ...) is read as a space, where pycocoevalcap's Java run would start a new
output line and misalign every later caption.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# Tokens pycocoevalcap removes after tokenising (pycocoevalcap/tokenizer/ptbtokenizer.py). The lexer's
# bracket tokens are lower-cased by ``-lowerCase`` (``-lrb-``), so those four never match and survive.
PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_NBSP = "\u00a0"


# --------------------------------------------------------------------------------------------------------
# Character classes. JFlex's %caseless makes literal text case-insensitive but leaves character classes
# as written, so literals are wrapped in (?i:...) and classes stay case-sensitive.
# --------------------------------------------------------------------------------------------------------
def _ranges(predicate: Callable[[str], bool]) -> str:
    """A regex character-class body holding every BMP character that satisfies ``predicate``."""
    parts: list[str] = []
    start = None
    for code in range(0x10000 + 1):
        inside = code < 0x10000 and not 0xD800 <= code < 0xE000 and predicate(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            end = code - 1
            parts.append(f"\\u{start:04x}" if start == end else f"\\u{start:04x}-\\u{end:04x}")
            start = None
    return "".join(parts)


# The lexer only knows the Basic Multilingual Plane (JFlex 1.4 works on UTF-16 code units).
_ALPHA = _ranges(str.isalpha)  # Java Character.isLetter: categories Lu Ll Lt Lm Lo
_DIGIT = _ranges(lambda ch: unicodedata.category(ch) == "Nd")  # Java Character.isDigit
# Combining marks and other characters CoreNLP adds to its letters.
_LETTER_EXTRA = (
    "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385"
    "\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd"
    "\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef"
    "\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903"
    "\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd"
    "\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2"
    "\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a"
    "\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd"
)
_SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"
_LETTER = f"(?:[{_ALPHA}{_LETTER_EXTRA}]|{_SPLET})"
_LETTER_OR_DIGIT = f"(?:[{_ALPHA}{_LETTER_EXTRA}{_DIGIT}]|{_SPLET})"
_ALNUM = f"[{_ALPHA}{_DIGIT}]"  # \p{Alpha}\p{Digit} in the lexer
_DIG = f"[{_DIGIT}]"

_SPACE_CHARS = " \t\u00a0\u2000-\u200a\u3000"
_SPACE = f"[{_SPACE_CHARS}]"
_SPACES = f"{_SPACE}+"
_NEWLINE = "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c\u0085])"
_SPACENL = f"(?:{_SPACE}|{_NEWLINE})"
_SPACENLS = f"{_SPACENL}+"

_APOS = "(?:['\u0092\u2019]|(?i:&apos;))"
_APOSETC = f"(?:{_APOS}|[`\u0091\u2018\u201b])"
_HYPHEN = "[-_\u058a\u2010\u2011]"

_SGML = (
    r"<(?:[!?][A-Za-z\-][^>\r\n]*"
    r"|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
    r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|[A-Za-z][A-Za-z0-9_:.\-]*)))*[ ]*/?"
    r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
)
_UPPER = _ranges(str.isupper)
_SENTEND = f"{_SPACENL}(?:{_SPACENL}|[{_UPPER}]|{_SGML})"

_NUM = f"{_DIG}*(?:[.:,\u00ad\u066b\u066c]{_DIG}+)+|{_DIG}+"
_NUMBER = f"[-+]?(?:{_NUM})"
_WORD = f"{_LETTER}{_LETTER_OR_DIGIT}*(?:[.!?]{_LETTER}{_LETTER_OR_DIGIT}*)*"
_SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
_REDAUX = f"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = f"(?i:n){_APOSETC}(?i:t)"
_ACRO = (
    r"[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
)
_ACRO2 = (
    r"[A-Za-z](?:\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
)

# Abbreviation lists. Upper-case letters in [] keep their case (the lexer spells them as classes).
_ABMONTH = "(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)"
_ABDAYS = "(?i:mon|tue|tues|wed|thu|thurs|fri)"
_ABSTATE = (
    "(?:(?i:ala|ariz)|A(?i:z)|A(?i:rk)|(?i:calif|colo|conn|ct|dak)|D(?i:el)|(?i:fla|ga)|I(?i:ll)|(?i:ind|kans?|ky)"
    "|L(?i:a)|M(?i:ass)|(?i:md|mich|minn)|M(?i:iss)|(?i:mo|mont|neb|nev|okla)|O(?i:re)|P(?i:a)"
    "|(?i:penn|tenn)|T(?i:ex)|(?i:va|vt)|W(?i:ash)|(?i:wisc?|wyo))"
)
_ABCOMP = "(?:(?i:inc|cos?|corp)|(?i:pp?t)[ye](?i:s)?|(?i:ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys))"
_ABNUM = "(?i:tel|est|ext|sq)"
_ABPTIT = r"(?i:jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq)"
_ABBREV1 = f"(?:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|(?i:etc|al|seq|bldg))\\."
_ABTITLE = (
    "(?:(?i:mr|mrs|ms)|M(?i:iss)|(?i:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj"
    "|sgt|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ft|adj|adv|asst|assoc|ens"
    "|insp|mlle|mme|msgr|sfc))"
)
_ABCOMP2 = "(?:(?i:invt|elec|natl|dept)|(?i:m)[ft](?i:g))"
_ABBREV4 = f"(?:{_ABTITLE}|(?i:vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph)|{_ACRO}|{_ABCOMP2})"
_ABBREV3 = "(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\\."
_ACRONYM_FOLLOWERS = (
    "About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|"
    "More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|These|They|"
    "This|We|When|While|What|Who|Why|Yet|You"
)
# First letter as written (class), the rest caseless, as the lexer's [A]bout.
_ACRONYM_NEXT = "|".join(f"{w[0]}(?i:{w[1:]})" if len(w) > 1 else w for w in _ACRONYM_FOLLOWERS.split("|"))

_APOWORD_PARTS = [
    f"{_APOS}(?i:n){_APOS}?",
    f"[lLdDjJ]{_APOS}",
    f"(?i:dunkin|somethin|ol){_APOS}",
    f"{_APOS}(?i:em)",
    f"[A-HJ-XZn]{_APOSETC}[{_ALPHA}]{{2}}[{_ALPHA}]*",
    f"{_APOS}[2-9]0(?i:s)",
    f"{_APOS}(?i:till?)",
    f"[{_ALPHA}][{_ALPHA}]*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z][{_ALPHA}]*",
    f"{_APOS}(?i:cause)",
    r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
    f"(?i:o){_APOSETC}(?i:o)",
]

_THING_PIECE = f"(?:[dDoOlL]{_APOSETC}{_ALNUM})?"
_THING = f"{_THING_PIECE}{_ALNUM}+(?:{_HYPHEN}{_THING_PIECE}{_ALNUM}+)*"
_THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:(?:{_ACRO2})\\.|[A-Za-z0-9\u00ad]+))+"
_FILENAME_EXT = (
    "(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png"
    "|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)"
)
_INSENTP = "[,;:\u3001]"
_QUOTE_CHARS = "[`\u2018-\u201f\u0082\u0084\u0091-\u0094\u2039\u203a\u00ab\u00bb]{1,2}"
_DBLQUOT = '(?:"|(?i:&quot;))'
_PHONE = (
    r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])"
    r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}"
)
_ASIAN_SMILEY_PARTS = [
    "[-^x=~<>']_[-^x=~<>']",
    "\\([-^x=~<>'][_.]?[-^x=~<>']\\)",
    "\\([\\^x=~<>']-[\\^x=~<>'`]\\)",
    "\u00af\\\\_\\(\u30c4\\)_/\u00af",
]
_MISCSYMBOL = (
    "[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7\u0387\u05be"
    "\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d"
    "\u07f6\u07f7\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042"
    "\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f"
    "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]"
)


# --------------------------------------------------------------------------------------------------------
# Token normalisations (the lexer's actions with the PTB3 escaping defaults).
# --------------------------------------------------------------------------------------------------------
def _latex_quotes(text: str, probably_left: bool) -> str:
    """Straight quotes become `` ` `` / ``` `` ``` when they open a quotation, ``'`` / ``''`` otherwise."""
    if probably_left:
        text = re.sub("(?i:&apos;)|'", "`", text)
        text = re.sub('"|(?i:&quot;)', "``", text)
    else:
        text = re.sub("(?i:&apos;)|'", "'", text)
        text = re.sub('"|(?i:&quot;)', "''", text)
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}


def _normalize_amp(text: str) -> str:
    return re.sub("(?i:&amp;)", "&", text)


def _remove_soft_hyphens(text: str) -> str:
    result = text.replace("\u00ad", "")
    return result if result else "-"


# --------------------------------------------------------------------------------------------------------
# The rule table.
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Lexed:
    """What an action makes of a match: the token text (None: emit nothing) and how much input it used."""

    text: str | None
    consumed: int


_Action = Callable[[str, str, int], _Lexed]  # (matched token text, whole input, position) -> result


def _keep(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(tok, len(tok))


def _skip(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(None, len(tok))


def _as(text: str) -> _Action:
    return lambda tok, _src, _pos: _Lexed(text, len(tok))


def _push_back(n: int) -> _Action:
    """Emit all but the last ``n`` characters; they are lexed again (``cannot`` -> ``can`` ``not``)."""
    return lambda tok, _src, _pos: _Lexed(tok[:-n], len(tok) - n)


def _map(fn: Callable[[str], str]) -> _Action:
    return lambda tok, _src, _pos: _Lexed(fn(tok), len(tok))


def _quotes(probably_left: bool) -> _Action:
    return _map(lambda tok: _latex_quotes(tok, probably_left))


def _period_twice(tok: str, _src: str, _pos: int) -> _Lexed:
    """Sentence-final abbreviation: emit it with its period and lex the period again as a sentence end."""
    return _Lexed(tok, len(tok) - 1)


def _acronym(tok: str, _src: str, _pos: int) -> _Lexed:
    """Acronym before a sentence start: ``I.`` gives ``I`` + ``.``; longer ones keep their period too."""
    if len(tok) == 2:
        return _Lexed(tok[:-1], 1)
    return _Lexed(tok, len(tok) - 1)


def _hyphens(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed("--" if 3 <= len(tok) <= 4 else tok, len(tok))


def _frac(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(tok.replace(" ", _NBSP), len(tok))


def _phone(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(tok.replace(" ", _NBSP).replace("(", "-LRB-").replace(")", "-RRB-"), len(tok))


def _paren_names(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(tok.replace("(", "-LRB-").replace(")", "-RRB-"), len(tok))


def _sgml(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(tok.replace(" ", _NBSP), len(tok))


def _fraction_char(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(_FRACTIONS.get(tok, tok), len(tok))


def _currency(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed(_CURRENCY.get(tok, tok), len(tok))


def _newline(tok: str, _src: str, _pos: int) -> _Lexed:
    return _Lexed("\n", len(tok))


@dataclass(frozen=True)
class _Rule:
    name: str
    pattern: re.Pattern[str]  # group "t" is the token; anything after it is trailing context
    action: _Action


def _rule(name: str, token: str, action: _Action = _keep, context: str | None = None) -> _Rule:
    source = f"(?P<t>{token})" + (f"(?:{context})" if context is not None else "")
    return _Rule(name, re.compile(source, re.DOTALL), action)


_NOT_SPACE_AFTER_QUOTE = f"[A-Za-z][^ \t\n\r{_NBSP}]"

_RULES: tuple[_Rule, ...] = (
    _rule("prog_langs", "(?i:c\\+\\+|[cf]#)"),
    _rule("assimilation3", "(?i:cannot|'twas)", _push_back(3)),
    _rule("assimilation2", "(?i:'tis|gonna|gotta|lemme|gimme|wanna)", _push_back(2)),
    _rule("sgml", _SGML, _sgml),
    _rule("spmdash", "(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", _as("--")),
    _rule("spamp", "(?i:&amp;)", _map(_normalize_amp)),
    _rule("sppunc", "(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)"),
    _rule("word_redaux", _WORD, _map(_remove_soft_hyphens), _REDAUX),
    _rule("sword_sredaux", _SWORD, _map(_remove_soft_hyphens), _SREDAUX),
    _rule("word", _WORD, _map(_remove_soft_hyphens)),
    *(_rule(f"apoword{i}", part) for i, part in enumerate(_APOWORD_PARTS)),
    _rule("apoword2", f"(?i:y){_APOS}", _keep, f"[{_ALPHA}]"),
    _rule(
        "fullurl",
        '(?i:https?)://[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-]',
    ),
    _rule(
        "likelyurl",
        '(?:(?:(?i:www)\\.(?:[^ \t\n\f\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4})'
        "|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\\.)+(?i:com|net|org|edu)))"
        '(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?',
    ),
    _rule(
        "email",
        '(?:<|(?i:&lt;))?[a-zA-Z0-9][^ \t\n\f\r"<>|(){}\u00a0]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\\.)*'
        '[^ \t\n\f\r"<>|(){}.\u00a0]+(?:>|(?i:&gt;))?',
    ),
    _rule("twitter_name", "@[a-zA-Z_][a-zA-Z_0-9]*"),
    _rule("twitter_tag", f"#{_LETTER}+"),
    _rule("redaux_ctx", _REDAUX, _quotes(False), "[^A-Za-z]"),
    _rule("sredaux_ctx", _SREDAUX, _quotes(False), f"[^{_ALPHA}]"),
    _rule("date", f"{_DIG}{{1,2}}[\\-/]{_DIG}{{1,2}}[\\-/]{_DIG}{{2,4}}"),
    _rule("number", _NUMBER, _map(_remove_soft_hyphens)),
    _rule(
        "subsupnum",
        "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
    ),
    _rule("frac", f"(?:{_DIG}{{1,4}}[- \u00a0])?{_DIG}{{1,4}}(?:\\\\?/|\u2044){_DIG}{{1,4}}", _frac),
    _rule("frac2", "[\u00bc\u00bd\u00be\u2153-\u215e]", _fraction_char),
    _rule(
        "tbspec",
        f"-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
        f"|(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)",
        _map(_normalize_amp),
    ),
    _rule("thing3", _THING3),
    _rule("dolsign", "[A-Z]*\\$|#"),
    _rule(
        "dolsign2",
        "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        _currency,
    ),
    _rule("acronym", f"(?:{_ACRO})\\.", _acronym, f"{_SPACENLS}(?:{_ACRONYM_NEXT}|{_SGML}){_SPACENL}"),
    _rule("abbrev3", _ABBREV3, _keep, f"{_SPACENL}?{_DIG}"),
    _rule("pty_ltd", "(?:(?i:pt)[eyEY]|(?i:co))\\.", _keep, f"{_SPACE}(?i:ltd|lim)"),
    _rule("abbrev1_sentend", _ABBREV1, _period_twice, _SENTEND),
    _rule("abbrev1_any", _ABBREV1, _keep, ".."),
    _rule("abbrev1_at_end", _ABBREV1, _period_twice),
    _rule("abbrev2", f"{_ABBREV4}\\."),
    _rule("abbrev4", _ABBREV4, _keep, _SPACE),
    _rule("acro", _ACRO, _keep, _SPACENL),
    _rule("tbspec2", f"{_APOS}[0-9][0-9]", _keep, _SPACENL),
    _rule("filename", f"{_ALNUM}+(?:\\.{_ALNUM}+)*\\.{_FILENAME_EXT}", _keep, f"{_SPACENL}|[.?!,]"),
    _rule("word_period", f"{_WORD}\\.", _map(_remove_soft_hyphens), _INSENTP),
    _rule("phone", _PHONE, _phone),
    _rule("dblquot_left", _DBLQUOT, _quotes(True), "[A-Za-z0-9$]"),
    _rule("dblquot", _DBLQUOT, _quotes(False)),
    _rule("del", "\u007f", _skip),
    _rule("smiley", "[<>]?[:;=][\\-o*']?[()DPdpO\\\\{@|\\[\\]]", _paren_names, "[^A-Za-z0-9]"),
    *(_rule(f"asian_smiley{i}", part, _paren_names) for i, part in enumerate(_ASIAN_SMILEY_PARTS)),
    _rule("lt", "<|(?i:&lt;)", _as("<")),
    _rule("gt", ">|(?i:&gt;)", _as(">")),
    _rule("lcb", "\\{", _as("-LCB-")),
    _rule("rcb", "\\}", _as("-RCB-")),
    _rule("lsb", "\\[", _as("-LSB-")),
    _rule("rsb", "\\]", _as("-RSB-")),
    _rule("lrb", "\\(", _as("-LRB-")),
    _rule("rrb", "\\)", _as("-RRB-")),
    _rule("hyphens", "-+", _hyphens),
    _rule("ldots", "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", _as("...")),
    _rule("fnmarks", "@+|#+|_+"),
    _rule("asts", "\\*+|(?:\\\\\\*){1,3}"),
    _rule("insentp", _INSENTP),
    _rule("bangs", "[?!]+"),
    _rule("period", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
    _rule("equals", "="),
    _rule("slash", "/"),
    _rule("hthing_period", f"{_HTHING}\\.", _map(_remove_soft_hyphens), _INSENTP),
    _rule("hthing", _HTHING, _map(_remove_soft_hyphens)),
    _rule("thing_period", f"(?:{_THING})\\.", _keep, _INSENTP),
    _rule("thing", _THING),
    _rule("thinga_period", f"{_THINGA}\\.", _map(_normalize_amp), _INSENTP),
    _rule("thinga", _THINGA, _map(_normalize_amp)),
    _rule("quote_left", "'", _quotes(True), _NOT_SPACE_AFTER_QUOTE),
    _rule("redaux", _REDAUX, _quotes(False)),
    _rule("sredaux", _SREDAUX, _quotes(False)),
    _rule("quotes_apos", _APOS, _quotes(False)),
    _rule("quotes_double", "''", _quotes(False)),
    _rule("quotes_other", _QUOTE_CHARS, _quotes(False)),
    _rule("fakeduckfeet", "<<|>>"),
    _rule("miscsymbol", _MISCSYMBOL),
    _rule("space", f"\u0000|{_SPACES}|[\u200b\u200e\u200f\ufeff]", _skip),
    _rule("newline", _NEWLINE, _newline),
    _rule("nbsp_entity", "(?i:&nbsp;)", _skip),
)
_UNTOKENIZABLE = _rule("untokenizable", ".", _skip)

# Most caption tokens are plain ASCII words followed by a space or a line end. No rule matches more than
# the word there (every longer rule needs an apostrophe, a period, a digit or a symbol, and none crosses a
# space), so the lexer takes them without trying the rule table; the words the lexer splits are excluded.
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|\Z)")
_SPACE_RUN = re.compile(_SPACES)
# Characters the Java lexer turns into line ends (U+0085 is lexed as an ellipsis instead).
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\u000b\u000c]")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _next_token(src: str, pos: int) -> tuple[_Rule, _Lexed]:
    """JFlex semantics: the longest match (trailing context included) wins, the earlier rule on ties."""
    best: tuple[int, _Rule, str] | None = None
    for rule in _RULES:
        match = rule.pattern.match(src, pos)
        if match is not None and (best is None or match.end() - pos > best[0]):
            best = (match.end() - pos, rule, match.group("t"))
    if best is None or best[0] == 0:
        rule, tok = _UNTOKENIZABLE, src[pos]
    else:
        _, rule, tok = best
    return rule, rule.action(tok, src, pos)


def _lex(src: str) -> Iterable[tuple[str, str]]:
    """Yield ``(rule name, token)`` for every token of ``src``; a newline yields the token ``"\\n"``."""
    pos, end = 0, len(src)
    while pos < end:
        if src[pos] == " ":  # only the whitespace rule can match here; it takes the whole run
            pos = _SPACE_RUN.match(src, pos).end()
            continue
        plain = _PLAIN_WORD.match(src, pos)
        if plain is not None and plain.group().lower() not in _SPLIT_WORDS:
            yield "word", plain.group()
            pos = plain.end()
            continue
        rule, lexed = _next_token(src, pos)
        if lexed.consumed <= 0:  # a rule must always make progress
            raise RuntimeError(f"PTB lexer rule {rule.name!r} consumed nothing at {src[pos : pos + 20]!r}")
        pos += lexed.consumed
        if lexed.text is not None:
            yield rule.name, lexed.text


def _to_utf16_units(line: str) -> str:
    """The lexer sees UTF-16 code units: a character beyond the BMP becomes its two surrogates."""
    if all(ord(ch) < 0x10000 for ch in line):
        return line
    return "".join(
        ch
        if ord(ch) < 0x10000
        else chr(0xD800 + ((ord(ch) - 0x10000) >> 10)) + chr(0xDC00 + (ord(ch) & 0x3FF))
        for ch in line
    )


def _from_utf16_units(token: str) -> str:
    if all(not 0xD800 <= ord(ch) < 0xE000 for ch in token):
        return token
    return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def ptb_tokenize_lines(lines: Sequence[str]) -> list[list[str]]:
    """Tokenise ``lines`` as CoreNLP's ``PTBTokenizer -preserveLines -lowerCase`` does.

    The lines are lexed as one text joined by ``\\n``, as pycocoevalcap writes them to one file, because
    some rules look across a line end (``etc.`` before a capitalised next line ends a sentence).
    Newline-like characters inside a line are turned into spaces first (pycocoevalcap only replaces
    ``\\n``; the others would shift its line alignment). Returns the lower-cased tokens of each line.
    """
    if not lines:
        return []
    cleaned = [_LINE_BREAKS.sub(" ", _to_utf16_units(line)) for line in lines]
    out: list[list[str]] = [[]]
    for _, token in _lex("\n".join(cleaned)):
        if token == "\n":
            out.append([])
        else:
            out[-1].append(_from_utf16_units(token).lower())
    if len(out) != len(lines):  # no rule consumes a line end inside a token; guard the invariant anyway
        raise RuntimeError(f"PTB lexer produced {len(out)} lines for {len(lines)} input lines")
    return out


def explain(text: str) -> list[tuple[str, str]]:
    """``(rule name, token)`` pairs for ``text``: for checking the lexer against the Java one by hand."""
    return list(_lex(text))


def tokenize_captions(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's caption tokenisation: PTB tokens, punctuation tokens removed, joined by spaces.

    Mirrors ``PTBTokenizer.tokenize`` line for line, including its ``rstrip().split(' ')`` of the Java
    output (tokens may hold a no-break space, which CIDEr's ``str.split`` later splits on).
    """
    lines = ptb_tokenize_lines([caption.replace("\n", " ") for caption in captions])
    return [
        " ".join(tok for tok in " ".join(tokens).rstrip().split(" ") if tok not in PUNCTUATIONS)
        for tokens in lines
    ]


if __name__ == "__main__":  # pragma: no cover - manual check: python -m ibkit.eval.ptb_tokenizer < file
    for line_tokens in ptb_tokenize_lines(sys.stdin.read().split("\n")):
        print(" ".join(line_tokens))
