"""User text -> clean sentences: Unicode clean-up, English normalisation, sentence splitting.

The text front end every engine can share: pure string work (no espeak, no model), so it is
cheap to test. English-specific
rewriting (numbers, currency, dates, abbreviations) only runs for ``en*`` languages; for other
languages espeak-ng's own number rules read digits in the right language.
"""

from __future__ import annotations

import re
import unicodedata

from voiced.engines.base import TextError

__all__ = ["clean", "normalize_english", "split_sentences", "number_to_words", "ordinal_words", "prepare"]

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}
_MONTHS = ("January February March April May June July August September October November December").split()


def _below_thousand(n: int) -> str:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(_ONES[n])
    return " ".join(words)


def number_to_words(n: int) -> str:
    """Cardinal in words: 1234 -> 'one thousand two hundred thirty-four'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= 10**15:  # beyond trillions people read digits
        return " ".join(_ONES[int(d)] for d in str(n))
    words: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            words += [number_to_words(n // value), name]
            n %= value
    if n or not words:
        words.append(_below_thousand(n))
    return " ".join(words)


def ordinal_words(n: int) -> str:
    """Ordinal in words: 21 -> 'twenty-first'."""
    words = number_to_words(n)
    head, sep, last = words.rpartition("-") if "-" in words.split(" ")[-1] else words.rpartition(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def year_words(n: int) -> str:
    """Year as spoken: 1984 -> 'nineteen eighty-four', 2005 -> 'two thousand five'."""
    if 2000 <= n <= 2009 or n % 1000 == 0 or n < 1000:
        return number_to_words(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return f"{number_to_words(hi)} hundred"
    return f"{number_to_words(hi)} {'oh ' if lo < 10 else ''}{number_to_words(lo)}"


def _decimal_words(text: str) -> str:
    whole, _, frac = text.partition(".")
    out = number_to_words(int(whole.replace(",", "") or 0))
    if frac:
        out += " point " + " ".join(_ONES[int(d)] for d in frac)
    return out


# ---------------------------------------------------------------------------------------------
# Unicode clean-up (all languages)

_QUOTE_MAP = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "«": "“", "»": "”", "„": "“", "‟": "“",
                            "–": "—", "―": "—", "‐": "-", "‑": "-", "\t": " ", "\u00a0": " "})


def clean(text: str) -> str:
    """Strip control/format characters and emoji, unify quotes and dashes, keep newlines."""
    text = unicodedata.normalize("NFKC", text)
    text = text.translate(_QUOTE_MAP).replace("\r\n", "\n").replace("\r", "\n")
    kept: list[str] = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch == "\n" or ch == "°" or (cat[0] != "C" and cat not in ("So", "Sk", "Mn") or ch in "\u0303"):
            kept.append(ch)
        elif cat == "Mn":  # keep accents on letters (NFKC composed most), drop stray combining marks
            if kept and kept[-1].isalpha():
                kept.append(ch)
        # Cc/Cf/Co/Cs/Cn (controls, zero-width joiners, private use) and So (emoji, symbols) go;
        # the degree sign (So too) stays: "-5°C" is read, espeak reads it in other languages.
    text = "".join(kept)
    text = re.sub(r"\.{3,}", "…", text)
    text = re.sub(r"(?<!\s)\s+-{1,2}\s+|--", " — ", text)  # (starts only where a space run starts: linear)
    # Straight double quotes alternate open/close, so Kokoro sees which side a quote is on.
    parts = text.split('"')
    text = "".join(p + ("“" if i % 2 == 0 else "”") for i, p in enumerate(parts[:-1])) + parts[-1]
    text = re.sub(r"[ ]+", " ", text)
    return text


# ---------------------------------------------------------------------------------------------
# English normalisation

_ABBREVIATIONS = {
    "mr": "Mister", "mrs": "Missus", "ms": "Miz", "dr": "Doctor", "prof": "Professor", "st": "Saint",
    "jr": "Junior", "sr": "Senior", "mt": "Mount", "gen": "General", "capt": "Captain", "lt": "Lieutenant",
    "col": "Colonel", "sgt": "Sergeant", "rev": "Reverend", "hon": "Honorable", "gov": "Governor",
    "sen": "Senator", "rep": "Representative", "ave": "Avenue", "blvd": "Boulevard", "rd": "Road",
    "vs": "versus", "etc": "etcetera", "approx": "approximately", "dept": "department", "est": "established",
    "jan": "January", "feb": "February", "mar": "March", "apr": "April", "jun": "June", "jul": "July",
    "aug": "August", "sep": "September", "sept": "September", "oct": "October", "nov": "November",
    "dec": "December", "inc": "Incorporated", "ltd": "Limited", "co": "Company", "corp": "Corporation",
}
_ABBR_RE = re.compile(r"\b(" + "|".join(sorted(_ABBREVIATIONS, key=len, reverse=True)) + r")\.(?=\s|$|,)", re.I)
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents"), "¥": ("yen", "yen", "sen", "sen")}
_NUM = r"\d{1,3}(?:,\d{3})+|\d+"
_SCALE_WORDS = r"thousand|million|billion|trillion"


def _money(m: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[m.group(1)]
    whole, frac, scale = m.group(2).replace(",", ""), m.group(3), m.group(4)
    if scale:
        amount = _decimal_words(whole + (f".{frac}" if frac else ""))
        return f"{amount} {scale} {many}"
    n = int(whole)
    out = f"{number_to_words(n)} {one if n == 1 else many}"
    if frac and int(frac.ljust(2, "0")[:2]):
        cents = int(frac.ljust(2, "0")[:2])
        out += f" and {number_to_words(cents)} {sub_one if cents == 1 else sub_many}"
    return out


def _date_words(year: int, month: int, day: int) -> str | None:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return f"{_MONTHS[month - 1]} {ordinal_words(day)}, {year_words(year)}"


def _iso_date(m: re.Match[str]) -> str:
    return _date_words(int(m.group(1)), int(m.group(2)), int(m.group(3))) or m.group(0).replace("-", " ")


def _us_date(m: re.Match[str]) -> str:
    year = int(m.group(3))
    year = year + 2000 if year < 100 else year
    return _date_words(year, int(m.group(1)), int(m.group(2))) or m.group(0).replace("/", " ")


def _time(m: re.Match[str]) -> str:
    h, mins, suffix = int(m.group(1)), int(m.group(2)), (m.group(3) or "").lower().replace(".", "")
    if h > 24 or mins > 59:
        return m.group(0)
    out = number_to_words(h)
    if mins == 0:
        out += "" if suffix else " o'clock"
    elif mins < 10:
        out += f" oh {number_to_words(mins)}"
    else:
        out += f" {number_to_words(mins)}"
    return out + (f" {' '.join(suffix.upper())}" if suffix else "")


def _number(m: re.Match[str]) -> str:
    raw = m.group(0)
    if "." in raw:
        return _decimal_words(raw)
    plain = raw.replace(",", "")
    n = int(plain)
    if "," not in raw and len(plain) == 4 and 1100 <= n <= 2099:
        return year_words(n)
    if len(plain) > 1 and plain.startswith("0"):  # codes, PINs: digit by digit
        return " ".join(_ONES[int(d)] for d in plain)
    return number_to_words(n)


def _street_or_title(m: re.Match[str]) -> str:
    """"St."/"Dr." after a name and not before one is a street ("Main St. near"), else a title."""
    before, abbr, after = m.group(1) or "", m.group(2), m.group(3) or ""
    street = bool(before) and before[0].isupper() and not (after and after[0].isupper())
    word = {"st": ("Saint", "Street"), "dr": ("Doctor", "Drive")}[abbr.lower()][street]
    return f"{before} {word}" if before else word


def _plural(words: str) -> str:
    """'nineteen ninety' -> 'nineteen nineties', 'two thousand' -> 'two thousands'."""
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _decade(m: re.Match[str]) -> str:
    digits = m.group(1)
    return _plural(year_words(int(digits)) if len(digits) == 4 else number_to_words(int(digits)))


_FRACTIONS = {2: ("half", "halves"), 4: ("quarter", "quarters")}
# denominators read as fractions; others ("9/11", "7/13") are more likely dates, ids or scores
_FRACTION_DENOMINATORS = {2, 3, 4, 5, 6, 8, 10, 12, 16, 32, 64, 100}


def _fraction(m: re.Match[str]) -> str:
    num, den = int(m.group(1)), int(m.group(2))
    if (num, den) == (24, 7):
        return "twenty-four seven"
    if num == den and m.group(1) == m.group(2):  # "50/50"
        return f"{number_to_words(num)}-{number_to_words(num)}"
    if den not in _FRACTION_DENOMINATORS or not 0 < num < den:  # a ratio, a date, a code, a path
        return m.group(0)
    one, many = _FRACTIONS.get(den, (ordinal_words(den), ordinal_words(den) + "s"))
    return f"{number_to_words(num)} {one if num == 1 else many}"


def _mixed_fraction(m: re.Match[str]) -> str:
    """'1 1/2' -> '1 and a half'; left alone unless the second part is a plain fraction."""
    frac = re.fullmatch(r"(\d+)/(\d+)", m.group(2))
    spoken = _fraction(frac) if frac else m.group(2)
    if spoken == m.group(2):
        return m.group(0)
    return f"{m.group(1)} and {'a' + spoken[3:] if spoken.startswith('one ') else spoken}"


# Case matters: "5G" is a network and "5 Mb" megabits, not grams and megabytes.
_UNITS = {
    "km": "kilometre", "cm": "centimetre", "mm": "millimetre", "kg": "kilogram", "mg": "milligram",
    "g": "gram", "lb": "pound", "lbs": "pound", "oz": "ounce", "ml": "millilitre", "mL": "millilitre",
    "ft": "foot", "mph": "mile per hour", "km/h": "kilometre per hour", "kph": "kilometre per hour",
    "kB": "kilobyte", "KB": "kilobyte", "MB": "megabyte", "GB": "gigabyte", "TB": "terabyte",
    "Hz": "hertz", "kHz": "kilohertz", "MHz": "megahertz", "GHz": "gigahertz",
    "kW": "kilowatt", "kWh": "kilowatt hour", "ms": "millisecond",
}
# (the look-behind lets a match start only where a number starts: long digit runs stay linear)
_UNIT_RE = re.compile(r"(?<![\d,.])(\d(?:[\d,]*\d)?(?:\.\d+)?)\s?(" + "|".join(sorted(map(re.escape, _UNITS), key=len, reverse=True)) + r")(?![\w/])")


def _unit(m: re.Match[str]) -> str:
    amount, unit = m.group(1), _UNITS[m.group(2)]
    if amount != "1":
        head, _, rest = unit.partition(" ")  # "mile per hour" -> "miles per hour"
        head = "feet" if head == "foot" else head if head.endswith("hertz") else head + "s"
        unit = f"{head} {rest}" if rest else head
    return f"{amount} {unit}"


def _phone(m: re.Match[str]) -> str:
    """'555-1234', '(555) 123-4567', '+1 555 123 4567', '12-34-56': digit by digit, a pause between groups."""
    groups = re.findall(r"\+?\d+", m.group(0))
    spoken = [" ".join(_ONES[int(d)] for d in g.lstrip("+")) for g in groups]
    if groups[0].startswith("+"):
        spoken[0] = "plus " + spoken[0]
    return ", ".join(spoken)


def _clock_seconds(m: re.Match[str]) -> str:
    """'1:30:15' -> 'one thirty and fifteen seconds' (a time or a duration, read alike)."""
    h, mins, secs = (int(g) for g in m.groups())
    if mins > 59 or secs > 59:
        return m.group(0)
    head = number_to_words(h) + (" o'clock" if mins == 0 else f" oh {number_to_words(mins)}" if mins < 10 else f" {number_to_words(mins)}")
    return head + (f" and {number_to_words(secs)} {'second' if secs == 1 else 'seconds'}" if secs else "")


def _degrees(m: re.Match[str]) -> str:
    scale = {"c": " Celsius", "f": " Fahrenheit"}.get((m.group(2) or "").lower(), "")
    return f"{m.group(1)} {'degree' if m.group(1) == '1' else 'degrees'}{scale}"


def normalize_english(text: str) -> str:
    """Spell out what espeak reads badly or literally: money, dates, times, numbers, units, fractions,
    temperatures, decades, versions, ratios, abbreviations (street or title by context), web addresses."""
    # digit strings too long for a number (card numbers, hashes) are read digit by digit, first
    text = re.sub(r"\d{1,3}(?:,\d{3}){5,}|\d{16,}", lambda m: " ".join(_ONES[int(d)] for d in m.group(0) if d != ","), text)
    text = re.sub(r"\bhttps?://", "", text)  # nobody reads the scheme of a web address aloud
    text = re.sub(r"(?:\b([A-Z][a-z]+) )?\b(St|Dr)\.(?=\s+(\w)|\s*$|,)", _street_or_title, text)
    text = _ABBR_RE.sub(lambda m: _ABBREVIATIONS[m.group(1).lower()], text)
    text = re.sub(r"\b(Mr|Mrs|Ms|Dr)(?= [A-Z])", lambda m: _ABBREVIATIONS[m.group(1).lower()], text)  # "Mr Smith"
    text = re.sub(r"\bNo\.(?=\s*\d)", "number", text)
    text = re.sub(r"\b(e\.g|i\.e)\.", lambda m: "for example" if m.group(1) == "e.g" else "that is", text)
    text = re.sub(r"\bPh\.\s?D\.?", "P H D", text)
    text = re.sub(r"\b([A-G])#(?!\w)", r"\1 sharp", text)  # C#, F#
    text = re.sub(r"(?<![\w&])#(?=[A-Za-z])", "", text)  # a hashtag is read as its word
    text = re.sub(r"\b(\d{4})-(\d{2})-(\d{2})\b", _iso_date, text)
    text = re.sub(r"\b(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})\b", _us_date, text)
    months = "|".join(_MONTHS)
    text = re.sub(rf"\b({months}) (\d{{1,2}})(?:st|nd|rd|th)?\b(?!:)", lambda m: f"{m.group(1)} {ordinal_words(int(m.group(2)))}", text)
    text = re.sub(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\) ?|\d{3}[ .-])?\d{3}[ .-]\d{4}\b", _phone, text)
    text = re.sub(r"\b(\d{1,2}):(\d{2}):(\d{2})\b", _clock_seconds, text)
    text = re.sub(r"\b(\d{1,2}):(\d{2})\s*([AaPp]\.?[Mm]\.?)?(?=\W|$)", _time, text)
    text = re.sub(r"\b(\d+):(\d+)\b", r"\1 to \2", text)  # what is left is a ratio or a score: 3:1
    text = re.sub(r"\b(\d+(?:\.\d+)?)\s?°\s?([CcFf](?![a-z]))?", _degrees, text)
    text = _UNIT_RE.sub(_unit, text)
    text = re.sub(r"\b(\d+) (\d+/\d+)\b", _mixed_fraction, text)
    text = re.sub(r"\b(\d+)/(\d+)\b", _fraction, text)
    text = re.sub(r"(?:\b|')(1[1-9]\d0|20\d0|[1-9]0)'?s\b", _decade, text)
    text = re.sub(r"\b\d+(?:\.\d+){2,}\b", lambda m: " dot ".join(m.group(0).split(".")), text)  # versions, addresses
    text = re.sub(r"(?<![\w-])\d+(?:-\d+){2,}(?![\w-])", _phone, text)  # ids in hyphenated groups: digit by digit
    text = re.sub(r"(?<![\w-])(\d+)-(\d+)(?![\w-])", r"\1 to \2", text)  # ranges and scores: 3-4 days, 2-1
    text = re.sub(r"\b(\d+(?:\.\d+)?)x\b", r"\1 times", text)
    text = re.sub(rf"([$£€¥])\s?({_NUM})(?:\.(\d+))?(?:\s?({_SCALE_WORDS})\b)?", _money, text)
    text = re.sub(rf"(?<![\d,])({_NUM})(?:\.(\d+))?\s?%", lambda m: _decimal_words(m.group(1).replace(",", "") + (f".{m.group(2)}" if m.group(2) else "")) + " percent", text)
    text = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: ordinal_words(int(m.group(1))), text)
    text = re.sub(r"(?<![\w.])-(?=\d)", "minus ", text)
    text = re.sub(rf"\b(?:{_NUM})(?:\.\d+)?\b", _number, text)
    text = text.replace("&", " and ").replace("@", " at ").replace("+", " plus ").replace("=", " equals ")
    text = text.replace("#", " number ").replace("/", " slash ").replace("*", " ").replace("_", " ")
    return re.sub(r"[ ]+", " ", text)


# ---------------------------------------------------------------------------------------------
# Sentences

# A sentence ends at . ! ? or … (and any closing quotes or brackets) unless the next word starts in
# lower case: "the U.S. border", "approx. five", "wait… what".
_SENTENCE_END = re.compile(r"(?<=[.!?…])[”)'\]]*\s+(?![a-z])")


def split_sentences(text: str) -> list[str]:
    """Split at sentence ends and at line breaks (a line without final punctuation gets a '.')."""
    out: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if line[-1] not in ".!?…;:,”)":
            line += "."
        out += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return out


def prepare(text: str, lang: str, max_chars: int) -> list[str]:
    """Validate, clean, normalise and split ``text``; raise TextError if nothing is left."""
    if not isinstance(text, str):
        raise TextError(f"text must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise TextError(f"text is too long: {len(text)} characters, the limit is {max_chars}")
    text = clean(text)
    if lang.lower().startswith("en"):
        text = normalize_english(text)
    sentences = [s for s in split_sentences(text) if any(ch.isalnum() for ch in s)]
    if not sentences:
        raise TextError("text is empty or has nothing to pronounce")
    return sentences
