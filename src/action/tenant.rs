//! Tenant names: what an action's `tenant` and a `[tenants.NAME]` config section may be called.
//! Names become metric labels and store columns, so they are short and plain.

/// Longest tenant name, in bytes (all ASCII).
pub const MAX_TENANT_LEN: usize = 64;

/// Why `name` is not a tenant name, or `None` when it is one. Empty is not a name (the action
/// then has no tenant).
pub fn tenant_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > MAX_TENANT_LEN {
        return Some(format!("is longer than {MAX_TENANT_LEN} characters"));
    }
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if !name.bytes().all(plain) {
        return Some("may hold only A-Z, a-z, 0-9, '.', '_' and '-'".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        for good in ["acme", "Acme-Corp_2.eu", &"a".repeat(64)] {
            assert_eq!(tenant_name_problem(good), None, "{good}");
        }
        for bad in ["", "a b", "a/b", "ä", "a\n", &"a".repeat(65)] {
            assert!(tenant_name_problem(bad).is_some(), "{bad:?}");
        }
    }
}
