//! The AT Protocol's string formats: DIDs, handles, NSIDs, record keys,
//! TIDs, AT-URIs, datetimes, language tags, URIs and CIDs.
//!
//! Each check is a plain function returning `Result<(), SyntaxError>` so a
//! Lexicon `format`, an API path segment and a CLI argument share one
//! definition. The rules follow the atproto specs and are held to the
//! interop vectors in `tests/vectors/syntax`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A string that is not of the format it was checked against.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {format}: {reason}")]
pub struct SyntaxError {
    pub format: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn fail(format: &'static str, value: &str, reason: &'static str) -> Result<(), SyntaxError> {
    let mut value = value.to_owned();
    if value.len() > 80 {
        let mut cut = 77;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
        value.push_str("...");
    }
    Err(SyntaxError {
        format,
        value,
        reason,
    })
}

/// A DID: `did:METHOD:IDENTIFIER`, at most 2 KiB.
pub fn did(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "DID";
    if s.len() > 2048 {
        return fail(F, s, "longer than 2048 characters");
    }
    let Some(rest) = s.strip_prefix("did:") else {
        return fail(F, s, "must start with \"did:\"");
    };
    let Some((method, id)) = rest.split_once(':') else {
        return fail(F, s, "needs a method and an identifier (did:method:id)");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_lowercase()) {
        return fail(F, s, "the method must be lowercase letters");
    }
    if id.is_empty() {
        return fail(F, s, "the identifier is empty");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".:_%-".contains(&b))
    {
        return fail(
            F,
            s,
            "the identifier may hold only letters, digits and ._:%-",
        );
    }
    if id.ends_with(':') || id.ends_with('%') {
        return fail(F, s, "may not end with ':' or '%'");
    }
    Ok(())
}

/// One DNS label: 1–63 letters, digits and hyphens, no hyphen at either end.
fn dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A handle: a DNS name of two or more labels whose last label starts with a letter.
pub fn handle(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "handle";
    if s.len() > 253 {
        return fail(F, s, "longer than 253 characters");
    }
    let labels: Vec<&str> = s.split('.').collect();
    if labels.len() < 2 {
        return fail(F, s, "needs at least two labels (name.tld)");
    }
    if !labels.iter().all(|l| dns_label(l)) {
        return fail(
            F,
            s,
            "each label is 1-63 letters, digits or inner hyphens, separated by single dots",
        );
    }
    if !labels[labels.len() - 1].starts_with(|c: char| c.is_ascii_alphabetic()) {
        return fail(F, s, "the last label must start with a letter");
    }
    Ok(())
}

/// A handle or a DID.
pub fn at_identifier(s: &str) -> Result<(), SyntaxError> {
    if s.starts_with("did:") {
        did(s)
    } else {
        handle(s).or_else(|_| fail("AT identifier", s, "neither a handle nor a DID"))
    }
}

/// A namespaced identifier: a reversed domain and a name, e.g. `app.bsky.feed.post`.
pub fn nsid(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "NSID";
    if s.len() > 317 {
        return fail(F, s, "longer than 317 characters");
    }
    let Some((domain, name)) = s.rsplit_once('.') else {
        return fail(F, s, "needs at least three segments (tld.domain.name)");
    };
    let segments: Vec<&str> = domain.split('.').collect();
    if segments.len() < 2 {
        return fail(F, s, "needs at least three segments (tld.domain.name)");
    }
    if !segments.iter().all(|l| dns_label(l)) {
        return fail(
            F,
            s,
            "each domain segment is 1-63 letters, digits or inner hyphens",
        );
    }
    if !segments[0].starts_with(|c: char| c.is_ascii_alphabetic()) {
        return fail(F, s, "the first segment must start with a letter");
    }
    if name.is_empty()
        || name.len() > 63
        || !name.starts_with(|c: char| c.is_ascii_alphabetic())
        || !name.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return fail(
            F,
            s,
            "the name (last segment) is a letter then up to 62 letters or digits",
        );
    }
    Ok(())
}

/// A record key: 1–512 of `A-Za-z0-9._:~-`, and neither `.` nor `..`.
pub fn record_key(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "record key";
    if s.is_empty() || s.len() > 512 {
        return fail(F, s, "must be 1 to 512 characters");
    }
    if s == "." || s == ".." {
        return fail(F, s, "may not be \".\" or \"..\"");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:~-".contains(&b))
    {
        return fail(F, s, "may hold only letters, digits and ._:~-");
    }
    Ok(())
}

const SORTABLE_BASE32: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

/// A timestamp identifier: 13 characters of base32-sortable, high bit zero.
pub fn tid(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "TID";
    let b = s.as_bytes();
    if b.len() != 13 {
        return fail(F, s, "must be exactly 13 characters");
    }
    if !b.iter().all(|c| SORTABLE_BASE32.contains(c)) {
        return fail(F, s, "may hold only 234567a-z");
    }
    if !b"234567abcdefghij".contains(&b[0]) {
        return fail(F, s, "the first character must be one of 234567a-j");
    }
    Ok(())
}

/// A generator of TIDs that never repeats and never goes backwards within
/// one process, even when the clock does.
pub struct TidClock {
    last: AtomicU64,
    clock_id: u64,
}

impl TidClock {
    /// `clock_id` (10 bits) tells apart writers that share a repository.
    pub fn new(clock_id: u16) -> Self {
        Self {
            last: AtomicU64::new(0),
            clock_id: u64::from(clock_id & 0x3ff),
        }
    }

    /// The next TID: microseconds since the epoch, strictly increasing.
    pub fn next(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut prev = self.last.load(Ordering::Relaxed);
        let micros = loop {
            let candidate = now.max(prev + 1);
            match self.last.compare_exchange_weak(
                prev,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break candidate,
                Err(seen) => prev = seen,
            }
        };
        encode_tid(micros, self.clock_id)
    }

    /// Moves the clock past `tid` so the next one sorts after it (a
    /// repository's revisions must increase even across restarts).
    pub fn observe(&self, tid: &str) {
        if let Some(micros) = decode_tid(tid) {
            self.last.fetch_max(micros, Ordering::Relaxed);
        }
    }
}

/// A TID from microseconds and a clock id.
pub fn encode_tid(micros: u64, clock_id: u64) -> String {
    let value = ((micros & ((1 << 53) - 1)) << 10) | (clock_id & 0x3ff);
    (0..13)
        .rev()
        .map(|i| SORTABLE_BASE32[((value >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The microseconds a TID carries.
pub fn decode_tid(s: &str) -> Option<u64> {
    tid(s).ok()?;
    let mut value = 0u64;
    for c in s.bytes() {
        let digit = SORTABLE_BASE32.iter().position(|&d| d == c)? as u64;
        value = (value << 5) | digit;
    }
    Some(value >> 10)
}

/// An AT-URI: `at://AUTHORITY[/COLLECTION[/RKEY]]`, no trailing slash, no
/// query or fragment, at most 8 KiB.
pub fn at_uri(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "AT-URI";
    if s.len() > 8 * 1024 {
        return fail(F, s, "longer than 8 KiB");
    }
    let Some(rest) = s.strip_prefix("at://") else {
        return fail(F, s, "must start with \"at://\"");
    };
    let mut parts = rest.split('/');
    let authority = parts.next().unwrap_or_default();
    if at_identifier(authority).is_err() {
        return fail(F, s, "the authority must be a handle or a DID");
    }
    if let Some(collection) = parts.next() {
        if nsid(collection).is_err() {
            return fail(F, s, "the first path segment must be an NSID");
        }
    }
    if let Some(rkey) = parts.next() {
        if record_key(rkey).is_err() {
            return fail(F, s, "the second path segment must be a record key");
        }
    }
    if parts.next().is_some() {
        return fail(F, s, "has more than two path segments");
    }
    Ok(())
}

/// An RFC 3339 datetime that is also ISO 8601: uppercase `T`, seconds, a
/// `Z` or `±hh:mm` offset (not `-00:00`), and a real instant at or after
/// year 0.
pub fn datetime(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "datetime";
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let shape = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':';
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        digits(0..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
        digits(17..19),
    ) else {
        return fail(F, s, "expected YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm)");
    };
    if !shape {
        return fail(F, s, "expected YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm)");
    }
    let mut rest = &s[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 20 {
            return fail(F, s, "the fraction of a second needs 1 to 20 digits");
        }
        rest = &fraction[n..];
    }
    let offset_minutes: i64 = match rest.as_bytes() {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()) =>
        {
            let hours = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let minutes = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if hours > 23 || minutes > 59 {
                return fail(F, s, "the offset is out of range");
            }
            if *sign == b'-' && hours == 0 && minutes == 0 {
                return fail(F, s, "\"-00:00\" is not allowed; write Z");
            }
            let total = hours * 60 + minutes;
            if *sign == b'-' {
                -total
            } else {
                total
            }
        }
        _ => return fail(F, s, "needs a time zone: Z or +hh:mm"),
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return fail(F, s, "the month is out of range"),
    };
    if day == 0 || day > days_in_month {
        return fail(F, s, "the day is out of range");
    }
    if hour > 23 || minute > 59 || second > 60 {
        return fail(F, s, "the time of day is out of range");
    }
    // Year 0000 at UTC+hh:mm falls before year 0.
    if year == 0 && month == 1 && day == 1 {
        let minutes_into_year = i64::from(hour * 60 + minute);
        if minutes_into_year - offset_minutes < 0 {
            return fail(F, s, "falls before year 0");
        }
    }
    Ok(())
}

/// A BCP 47 language tag, checked as atproto does: a 2–3 letter language
/// (or `i`/`x`), subtags of 1–8 letters or digits, no repeated variant or
/// extension singleton.
pub fn language(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "language tag";
    let mut subtags = s.split('-');
    let primary = subtags.next().unwrap_or_default();
    let primary_ok = (2..=3).contains(&primary.len())
        && primary.bytes().all(|b| b.is_ascii_lowercase())
        || primary == "i"
        || primary.eq_ignore_ascii_case("x");
    if !primary_ok {
        return fail(F, s, "must start with a 2-3 letter lowercase language code");
    }
    let mut private = primary.eq_ignore_ascii_case("x");
    let mut in_extension = false;
    let mut variants: Vec<String> = Vec::new();
    let mut singletons: Vec<u8> = Vec::new();
    for tag in subtags {
        if tag.is_empty() || tag.len() > 8 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return fail(F, s, "each subtag is 1-8 letters or digits");
        }
        if private {
            continue;
        }
        if tag.len() == 1 {
            let singleton = tag.as_bytes()[0].to_ascii_lowercase();
            if singleton == b'x' {
                private = true;
                continue;
            }
            if singletons.contains(&singleton) {
                return fail(F, s, "repeats an extension singleton");
            }
            singletons.push(singleton);
            in_extension = true;
            continue;
        }
        let variant = tag.len() >= 5 || (tag.len() == 4 && tag.as_bytes()[0].is_ascii_digit());
        if variant && !in_extension {
            let lower = tag.to_ascii_lowercase();
            if variants.contains(&lower) {
                return fail(F, s, "repeats a variant subtag");
            }
            variants.push(lower);
        }
    }
    Ok(())
}

/// A URI: a scheme, a colon and no whitespace, at most 8 KiB.
pub fn uri(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "URI";
    if s.len() > 8 * 1024 {
        return fail(F, s, "longer than 8 KiB");
    }
    let Some((scheme, rest)) = s.split_once(':') else {
        return fail(F, s, "needs a scheme (scheme:rest)");
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme.len() <= 81
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b));
    if !scheme_ok {
        return fail(
            F,
            s,
            "the scheme is a lowercase letter then letters, digits, + . -",
        );
    }
    if rest.is_empty() || rest.chars().any(char::is_whitespace) {
        return fail(F, s, "needs a non-empty rest without whitespace");
    }
    Ok(())
}

/// The string form of a CID, checked for shape only (8–256 of `A-Za-z0-9+=`,
/// no CIDv0). [`crate::model::parse_cid`] decodes one.
pub fn cid_syntax(s: &str) -> Result<(), SyntaxError> {
    const F: &str = "CID";
    if s.len() < 8 || s.len() > 256 {
        return fail(F, s, "must be 8 to 256 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'=')
    {
        return fail(F, s, "may hold only letters, digits, + and =");
    }
    // A CIDv0 is the base58 of a SHA-256 multihash, which always reads "Qm...".
    if s.len() == 46 && s.starts_with("Qm") {
        return fail(F, s, "CIDv0 is not supported");
    }
    Ok(())
}

/// A Lexicon string `format` name and its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    AtIdentifier,
    AtUri,
    Cid,
    Datetime,
    Did,
    Handle,
    Nsid,
    Tid,
    RecordKey,
    Uri,
    Language,
}

impl Format {
    /// The format named in a Lexicon document, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "at-identifier" => Self::AtIdentifier,
            "at-uri" => Self::AtUri,
            "cid" => Self::Cid,
            "datetime" => Self::Datetime,
            "did" => Self::Did,
            "handle" => Self::Handle,
            "nsid" => Self::Nsid,
            "tid" => Self::Tid,
            "record-key" => Self::RecordKey,
            "uri" => Self::Uri,
            "language" => Self::Language,
            _ => return None,
        })
    }

    /// Checks `value` against this format.
    pub fn check(self, value: &str) -> Result<(), SyntaxError> {
        match self {
            Self::AtIdentifier => at_identifier(value),
            Self::AtUri => at_uri(value),
            Self::Cid => {
                cid_syntax(value)?;
                crate::model::parse_cid(value)
                    .map(drop)
                    .or_else(|_| fail("CID", value, "does not decode"))
            }
            Self::Datetime => datetime(value),
            Self::Did => did(value),
            Self::Handle => handle(value),
            Self::Nsid => nsid(value),
            Self::Tid => tid(value),
            Self::RecordKey => record_key(value),
            Self::Uri => uri(value),
            Self::Language => language(value),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AtIdentifier => "at-identifier",
            Self::AtUri => "at-uri",
            Self::Cid => "cid",
            Self::Datetime => "datetime",
            Self::Did => "did",
            Self::Handle => "handle",
            Self::Nsid => "nsid",
            Self::Tid => "tid",
            Self::RecordKey => "record-key",
            Self::Uri => "uri",
            Self::Language => "language",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tids_increase_and_round_trip() {
        let clock = TidClock::new(7);
        let a = clock.next();
        let b = clock.next();
        assert!(a < b, "{a} < {b}");
        tid(&a).unwrap();
        let micros = decode_tid(&b).unwrap();
        assert_eq!(encode_tid(micros, 7), b);
        // A revision written later (by another process) moves the clock on.
        let later = encode_tid(micros + 60_000_000, 0);
        clock.observe(&later);
        assert!(clock.next() > later);
    }
}
