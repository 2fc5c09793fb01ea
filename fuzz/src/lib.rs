//! Helpers shared by the fuzz targets: a small secret store, a minimal valid action, and a
//! model of the IPv4 spellings a resolver (inet_aton) accepts.
use callout::action::{secret_ref::SecretSource, ActionInput, InvalidAction};

/// A secret value no input spells by accident: it must never show up in an error.
pub const TOKEN: &str = "Zq9TokenValue7x";

/// Secrets the targets can refer to: `TOKEN` (plain), `CRLF` (a value that cannot be a header
/// value), `QUOTE` (needs escaping inside JSON and URLs).
pub struct FuzzSecrets;

impl SecretSource for FuzzSecrets {
    fn secret(&self, name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some(TOKEN.to_owned()),
            "CRLF" => Some("a\r\nInjected: yes".to_owned()),
            "QUOTE" => Some("\"}{\\/ &?#%".to_owned()),
            _ => None,
        }
    }
}

/// The smallest action that passes validation; targets change one part of it.
pub fn minimal_input() -> ActionInput {
    ActionInput { method: "GET".into(), url: "https://api.example.com/v1".into(), ..Default::default() }
}

/// Every violation's field and description, for leak checks.
pub fn error_text(bad: &InvalidAction) -> String {
    let mut text = bad.to_string();
    for v in &bad.violations {
        text.push('\n');
        text.push_str(&v.field);
        text.push('\n');
        text.push_str(&v.description);
    }
    text
}

/// Asserts that no error names the secret value, unless the input itself spelled it.
pub fn assert_no_secret(bad: &InvalidAction, input: &[u8]) {
    if contains(input, TOKEN.as_bytes()) {
        return;
    }
    let text = error_text(bad);
    assert!(!text.contains(TOKEN), "a secret value leaked into an error: {text}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The address `inet_aton` (and so `getaddrinfo` in many libcs) reads from `host`: one to four
/// dot-separated parts, each decimal, octal (leading 0) or hex (0x). `None` for a name.
pub fn inet_aton(host: &str) -> Option<u32> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (*part, 10)
        };
        if (digits.is_empty() && radix != 16) || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        let value = if digits.is_empty() { 0 } else { u64::from_str_radix(digits, radix).ok()? };
        values.push(value);
    }
    let (last, head) = values.split_last()?;
    if head.iter().any(|&v| v > 255) {
        return None;
    }
    let last_bits = 8 * (4 - head.len() as u32);
    if last_bits < 64 && *last >= (1u64 << last_bits) {
        return None;
    }
    let mut addr: u64 = 0;
    for (i, v) in head.iter().enumerate() {
        addr |= v << (24 - 8 * i as u32);
    }
    Some((addr | last) as u32)
}
