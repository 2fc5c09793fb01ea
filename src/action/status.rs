//! Status specs: which HTTP statuses count as success (or retry), written as "200,201", "2xx",
//! "200-299,304".
use std::fmt;

/// A set of status codes parsed from a spec such as `"200-299,304"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSpec {
    ranges: Vec<(u16, u16)>,
    text: String,
}

/// Why a status spec did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusSpecError {
    #[error("is empty")]
    Empty,
    #[error("item {item:?} is not a status (100-599), a class (1xx-5xx) or a range (200-299)")]
    BadItem { item: String },
    #[error("range {item:?} runs backwards")]
    Backwards { item: String },
}

impl StatusSpec {
    /// Parses a comma-separated list of statuses (`404`), classes (`2xx`) and inclusive ranges
    /// (`200-299`). White space around items is ignored.
    pub fn parse(text: &str) -> Result<Self, StatusSpecError> {
        let mut ranges = Vec::new();
        for raw in text.split(',') {
            let item = raw.trim();
            if item.is_empty() {
                if text.trim().is_empty() {
                    return Err(StatusSpecError::Empty);
                }
                return Err(StatusSpecError::BadItem { item: quoted(raw) });
            }
            ranges.push(parse_item(item)?);
        }
        Ok(Self { ranges, text: text.trim().to_owned() })
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        self.ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }

    /// The spec as written (trimmed), for messages.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for StatusSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_item(item: &str) -> Result<(u16, u16), StatusSpecError> {
    let bad = || StatusSpecError::BadItem { item: quoted(item) };
    if let Some(class) = parse_class(item) {
        return Ok((class * 100, class * 100 + 99));
    }
    if let Some((lo, hi)) = item.split_once('-') {
        let lo = parse_status(lo.trim()).ok_or_else(bad)?;
        let hi = parse_status(hi.trim()).ok_or_else(bad)?;
        if lo > hi {
            return Err(StatusSpecError::Backwards { item: quoted(item) });
        }
        return Ok((lo, hi));
    }
    let status = parse_status(item).ok_or_else(bad)?;
    Ok((status, status))
}

/// An item as quoted in an error: a short excerpt, however long the caller wrote it.
fn quoted(item: &str) -> String {
    super::excerpt::excerpt(item, 64).into_owned()
}

/// `"4xx"` → `Some(4)`, for classes 1 to 5 (case-insensitive).
pub(crate) fn parse_class(item: &str) -> Option<u16> {
    let bytes = item.as_bytes();
    if bytes.len() == 3 && bytes[1].eq_ignore_ascii_case(&b'x') && bytes[2].eq_ignore_ascii_case(&b'x') {
        let class = (bytes[0] as char).to_digit(10)? as u16;
        return (1..=5).contains(&class).then_some(class);
    }
    None
}

/// A three-digit status from 100 to 599.
pub(crate) fn parse_status(item: &str) -> Option<u16> {
    if item.len() != 3 || !item.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let status: u16 = item.parse().ok()?;
    (100..=599).contains(&status).then_some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_classes_and_ranges() {
        let spec = StatusSpec::parse("200-299, 304,4XX").unwrap();
        assert!(spec.contains(200) && spec.contains(299) && spec.contains(304));
        assert!(spec.contains(404) && spec.contains(499));
        assert!(!spec.contains(300) && !spec.contains(500) && !spec.contains(199));
        assert_eq!(spec.as_str(), "200-299, 304,4XX");
    }

    #[test]
    fn single_codes() {
        let spec = StatusSpec::parse("200,201").unwrap();
        assert!(spec.contains(201));
        assert!(!spec.contains(202));
    }

    #[test]
    fn rejects_bad_specs() {
        assert_eq!(StatusSpec::parse(" "), Err(StatusSpecError::Empty));
        for bad in ["abc", "2x", "6xx", "0xx", "99", "600", "200,", "20a", "200-abc", "-200", "2000"] {
            assert!(
                matches!(StatusSpec::parse(bad), Err(StatusSpecError::BadItem { .. })),
                "{bad:?} should be rejected"
            );
        }
        assert!(matches!(StatusSpec::parse("299-200"), Err(StatusSpecError::Backwards { .. })));
    }
}
