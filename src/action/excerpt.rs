//! Quoting a caller's value in an error: a short excerpt, however long the value.

/// At most `max` bytes of `s`, cut at a character boundary, with "…" when cut: a caller's
/// value quoted in an error stays short, however long the value.
pub fn excerpt(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_cut_at_char_boundaries() {
        assert_eq!(excerpt("short", 64), "short");
        assert_eq!(excerpt("ééé", 3), "é…");
        assert_eq!(excerpt(&"ü".repeat(1000), 64).len(), 64 + "…".len());
    }
}
