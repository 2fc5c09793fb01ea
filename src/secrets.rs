//! The secret store behind `{{secret:NAME}}`: a directory with one file per secret (as
//! Kubernetes mounts a Secret), then environment variables with a configured prefix. A file
//! is read at each use, so a rotated secret takes effect with the next action.
use crate::action::secret_ref::{is_valid_name, SecretSource};
use std::{
    io::Read,
    path::{Path, PathBuf},
};

/// The `[secrets]` section: where secrets come from. Both unset (the default): no secrets,
/// every reference is unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretSettings {
    /// Directory holding one file per secret, named as the secret. Default none.
    pub dir: Option<PathBuf>,
    /// Prefix of environment variables holding secrets: NAME is read from `{prefix}NAME`.
    /// Default none (the environment is not read).
    pub env_prefix: Option<String>,
}

/// A secret file larger than this is refused: secrets are tokens, not documents.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Reads secrets by their settings.
#[derive(Debug, Clone, Default)]
pub struct SecretStore {
    settings: SecretSettings,
}

impl SecretStore {
    pub fn new(settings: SecretSettings) -> Self {
        Self { settings }
    }

    fn from_dir(dir: &Path, name: &str) -> Option<String> {
        let file = std::fs::File::open(dir.join(name)).ok()?;
        let mut raw = String::new();
        if let Err(e) = file.take(MAX_SECRET_BYTES + 1).read_to_string(&mut raw) {
            // Never the value; the name and why.
            tracing::warn!(secret = name, "cannot read secret file: {e}");
            return None;
        }
        if raw.len() as u64 > MAX_SECRET_BYTES {
            tracing::warn!(secret = name, "secret file is larger than {MAX_SECRET_BYTES} bytes; ignored");
            return None;
        }
        // `echo token > file` leaves a newline that no token means to carry.
        let trimmed = raw.trim_end_matches(['\r', '\n']).len();
        raw.truncate(trimmed);
        Some(raw)
    }
}

impl SecretSource for SecretStore {
    fn secret(&self, name: &str) -> Option<String> {
        if !is_valid_name(name) {
            return None;
        }
        if let Some(value) = self.settings.dir.as_deref().and_then(|dir| Self::from_dir(dir, name)) {
            return Some(value);
        }
        let prefix = self.settings.env_prefix.as_deref()?;
        std::env::var(format!("{prefix}{name}")).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_fresh_and_refuses_paths() {
        let dir = std::env::temp_dir().join(format!("callout-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "one\n").unwrap();
        let store = SecretStore::new(SecretSettings { dir: Some(dir.clone()), env_prefix: None });
        assert_eq!(store.secret("token").as_deref(), Some("one"));
        std::fs::write(dir.join("token"), "two").unwrap();
        assert_eq!(store.secret("token").as_deref(), Some("two"), "re-read after rotation");
        assert_eq!(store.secret("missing"), None);
        assert_eq!(store.secret("../token"), None);
        std::fs::write(dir.join("big"), vec![b'x'; MAX_SECRET_BYTES as usize + 1]).unwrap();
        assert_eq!(store.secret("big"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_settings_means_no_secrets() {
        assert_eq!(SecretStore::default().secret("PATH"), None);
    }
}
