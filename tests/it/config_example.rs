//! `callout.example.toml` stays true: it loads to exactly the defaults, its commented-out
//! optional keys are valid when switched on, and it names every key of `Config`, so a new key
//! without documentation fails here with its name. The config in deploy/configmap.yaml loads too.
use callout::config::Config;
use figment::{
    error::Kind,
    providers::{Format, Toml},
    Figment,
};
use std::path::{Path, PathBuf};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("callout.example.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example_path()).expect("callout.example.toml at the repository root")
}

/// `# key = value` at the start of a line: an optional key shown with an example value.
fn commented_key(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("# ")?;
    let (key, _) = rest.split_once(" = ")?;
    (!key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        .then_some(key)
}

#[test]
fn example_config_loads_to_the_defaults() {
    let config = Config::extract(&Config::layers(Some(&example_path())))
        .unwrap_or_else(|e| panic!("callout.example.toml does not load: {e}"));
    assert_eq!(config, Config::default(), "callout.example.toml's active values must be the defaults");
}

#[test]
fn example_config_optional_keys_are_valid_when_uncommented() {
    let text = example_text();
    let mut uncommented = 0;
    let switched_on: String = text
        .lines()
        .map(|line| match commented_key(line) {
            Some(_) => {
                uncommented += 1;
                format!("{}\n", &line[2..])
            }
            None => format!("{line}\n"),
        })
        .collect();
    assert!(uncommented > 0, "expected some `# key = value` lines in callout.example.toml");
    let figment = Figment::from(figment::providers::Serialized::defaults(Config::default()))
        .merge(Toml::string(&switched_on));
    let config = Config::extract(&figment)
        .unwrap_or_else(|e| panic!("callout.example.toml with its optional keys switched on: {e}"));
    assert_ne!(config, Config::default());
    assert!(config.server.tls_cert.is_some() && config.secrets.dir.is_some());
}

/// Whether the example file documents `key` of `[section]`: a `key =` or `# key =` line inside
/// that section.
fn documented(text: &str, section: &str, key: &str) -> bool {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
            continue;
        }
        let active = line.split_once(" = ").map(|(k, _)| k.trim());
        if current == section && (active == Some(key) || commented_key(line) == Some(key)) {
            return true;
        }
    }
    false
}

/// Key paths of a TOML tree: tables are walked, everything else (and an empty table, such as
/// an empty map) is a key.
fn key_paths(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) if !table.is_empty() || prefix.is_empty() => {
            for (key, value) in table {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                key_paths(&path, value, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

/// The field names serde knows for `Config` (or one of its sections): every struct is
/// `deny_unknown_fields`, so an unknown key's error lists them all, `Option` keys included
/// (which the serialized defaults leave out).
fn known_fields(section: Option<&str>) -> &'static [&'static str] {
    try_known_fields(section)
        .unwrap_or_else(|| panic!("no unknown-field error for a probe key in {section:?}"))
}

/// `known_fields`, or `None` when the section takes any key (a map).
fn try_known_fields(section: Option<&str>) -> Option<&'static [&'static str]> {
    let probe = match section {
        Some(section) => format!("[{section}]\n__undocumented_probe__ = 1\n"),
        None => "__undocumented_probe__ = 1\n".to_owned(),
    };
    let err = Figment::from(Toml::string(&probe)).extract::<Config>().expect_err("unknown key must fail");
    err.into_iter().find_map(|e| match e.kind {
        Kind::UnknownField(_, expected) => Some(expected),
        _ => None,
    })
}

#[test]
fn example_config_documents_every_key() {
    let text = example_text();
    let mut paths = Vec::new();
    let defaults = toml::Value::try_from(Config::default()).unwrap();
    // The same tree `callout config print` shows.
    assert!(toml::to_string(&Config::default()).unwrap().contains("[server]"));
    key_paths("", &defaults, &mut paths);
    for section in known_fields(None) {
        // A section of named tables ([tenants.NAME]) has no keys of its own: its tables' keys
        // are those of its `default` table, documented there.
        let section = match try_known_fields(Some(section)) {
            Some(_) => section.to_string(),
            None => format!("{section}.default"),
        };
        paths.extend(known_fields(Some(&section)).iter().map(|key| format!("{section}.{key}")));
    }
    paths.sort();
    paths.dedup();
    assert!(paths.len() > 30, "too few keys found, the walk is broken: {paths:?}");

    let missing: Vec<&String> = paths
        .iter()
        .filter(|path| {
            // A section (also a nested one such as [store.postgres]; one whose defaults are all
            // unset serializes as an empty table) is documented by its header.
            if text.lines().any(|line| line.trim() == format!("[{path}]")) {
                return false;
            }
            match path.rsplit_once('.') {
                Some((section, key)) => !documented(&text, section, key),
                None => true,
            }
        })
        .collect();
    assert!(
        missing.is_empty(),
        "callout.example.toml does not document these keys (add `key = default` or `# key = example` \
         with its unit, default and why, in its [section]): {missing:?}"
    );
}

#[test]
fn the_documentation_check_notices_a_missing_key() {
    let text = example_text();
    assert!(documented(&text, "limits", "max_in_flight"));
    assert!(documented(&text, "server", "tls_cert"), "commented-out keys count");
    assert!(!documented(&text, "server", "max_in_flight"), "a key counts only in its own section");
    let without: String =
        text.lines().filter(|l| !l.starts_with("breaker_cool_down")).map(|l| format!("{l}\n")).collect();
    assert!(!documented(&without, "limits", "breaker_cool_down"));
    assert!(known_fields(Some("server")).contains(&"tls_client_ca"));
}

/// The `callout.toml` block of `deploy/configmap.yaml` (a YAML literal block indented 4 spaces).
fn deploy_config_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/configmap.yaml");
    let yaml = std::fs::read_to_string(&path).expect("deploy/configmap.yaml");
    let block: Vec<&str> = yaml
        .lines()
        .skip_while(|line| line.trim() != "callout.toml: |")
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| line.get(4..).unwrap_or(""))
        .collect();
    assert!(!block.is_empty(), "no `callout.toml: |` block in {}", path.display());
    block.join("\n")
}

#[test]
fn deploy_configmap_config_loads_and_keeps_private_networks_denied() {
    let figment = Figment::from(figment::providers::Serialized::defaults(Config::default()))
        .merge(Toml::string(&deploy_config_text()));
    let config =
        Config::extract(&figment).unwrap_or_else(|e| panic!("deploy/configmap.yaml's callout.toml: {e}"));
    assert!(!config.egress.allow_private_networks);
    assert_eq!(
        config.server.listen.to_string(),
        "0.0.0.0:50051",
        "the kubelet's gRPC probes dial the pod IP"
    );
    assert!(config.server.auth_token_file.is_some(), "a listener beyond loopback needs the bearer token");
    assert!(config.secrets.dir.is_some());
}
