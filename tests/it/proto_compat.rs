//! Proto stability: the wire contract of `callout.v1` must not change under its callers.
//!
//! Every message field and enum value of the package, as `Name.member = number`, is compared
//! with the committed snapshot `proto/callout/v1/fields.snapshot`. Renumbering or removing one
//! fails (stubs generated from the old proto would silently misread replies); a new one must be
//! added to the snapshot, and the failure prints the lines to add. A retired member keeps its
//! line and is `reserved` (number and name) in the proto. The descriptors are the ones
//! compiled into the binary (`callout::pb::FILE_DESCRIPTOR_SET`, served by reflection too), so
//! what is checked is what callers see.
use callout::pb::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_types::{
    source_code_info::Location, DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
};
use std::collections::BTreeMap;

const PACKAGE: &str = "callout.v1";
const SNAPSHOT_PATH: &str = "proto/callout/v1/fields.snapshot";
const SNAPSHOT: &str = include_str!("../../proto/callout/v1/fields.snapshot");

// Field numbers of descriptor.proto, for paths into SourceCodeInfo.
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn package_files() -> Vec<FileDescriptorProto> {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes");
    let files: Vec<_> = set.file.into_iter().filter(|f| f.package() == PACKAGE).collect();
    assert!(!files.is_empty(), "no file of package {PACKAGE} in FILE_DESCRIPTOR_SET");
    files
}

/// A message's or enum's reserved numbers (inclusive ranges) and names.
type Reserved = (Vec<(i32, i32)>, Vec<String>);

/// What the walk over one file's declarations collects.
#[derive(Default)]
struct Walk {
    /// `Message.field` or `Enum.VALUE` → number.
    numbers: BTreeMap<String, i32>,
    /// Enums whose zero value is missing or not `*_UNSPECIFIED`.
    bad_zero: Vec<String>,
    /// (what, file index, SourceCodeInfo path) of every declaration that needs a comment.
    documented: Vec<(String, usize, Vec<i32>)>,
    /// Message or enum → what it reserves.
    reserved: BTreeMap<String, Reserved>,
    /// The index of the file being walked.
    file: usize,
}

impl Walk {
    fn need_comment(&mut self, what: String, path: Vec<i32>) {
        self.documented.push((what, self.file, path));
    }

    fn message(&mut self, prefix: &str, message: &DescriptorProto, path: Vec<i32>) {
        // Map fields are carried by synthetic `XxxEntry` messages; their key = 1, value = 2 are
        // fixed by the language, and their comments are the map field's.
        if message.options.as_ref().and_then(|o| o.map_entry).unwrap_or(false) {
            return;
        }
        let name = format!("{prefix}{}", message.name());
        self.need_comment(format!("message {name}"), path.clone());
        // A message's reserved range ends before `end`.
        let ranges = message.reserved_range.iter().map(|r| (r.start(), r.end() - 1)).collect();
        self.reserved.insert(name.clone(), (ranges, message.reserved_name.clone()));
        for (i, field) in message.field.iter().enumerate() {
            let key = format!("{name}.{}", field.name());
            self.numbers.insert(key.clone(), field.number());
            self.need_comment(format!("field {key}"), [&path[..], &[MESSAGE_FIELD, i as i32]].concat());
        }
        for (i, nested) in message.nested_type.iter().enumerate() {
            self.message(&format!("{name}."), nested, [&path[..], &[MESSAGE_NESTED_TYPE, i as i32]].concat());
        }
        for (i, e) in message.enum_type.iter().enumerate() {
            self.enumeration(&format!("{name}."), e, [&path[..], &[MESSAGE_ENUM_TYPE, i as i32]].concat());
        }
    }

    fn enumeration(&mut self, prefix: &str, e: &EnumDescriptorProto, path: Vec<i32>) {
        let name = format!("{prefix}{}", e.name());
        self.need_comment(format!("enum {name}"), path.clone());
        // An enum's reserved range includes `end`.
        let ranges = e.reserved_range.iter().map(|r| (r.start(), r.end())).collect();
        self.reserved.insert(name.clone(), (ranges, e.reserved_name.clone()));
        for (i, value) in e.value.iter().enumerate() {
            let key = format!("{name}.{}", value.name());
            self.numbers.insert(key.clone(), value.number());
            // The zero value of an UNSPECIFIED enum says all it needs in its name.
            if value.number() != 0 {
                self.need_comment(format!("enum value {key}"), [&path[..], &[ENUM_VALUE, i as i32]].concat());
            }
        }
        match e.value.iter().find(|v| v.number() == 0) {
            Some(zero) if zero.name().ends_with("_UNSPECIFIED") => {}
            Some(zero) => self.bad_zero.push(format!("{name}: zero value is {}", zero.name())),
            None => self.bad_zero.push(format!("{name}: no zero value")),
        }
    }

    fn file(&mut self, file: &FileDescriptorProto) {
        for (i, message) in file.message_type.iter().enumerate() {
            self.message("", message, vec![FILE_MESSAGE_TYPE, i as i32]);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            self.enumeration("", e, vec![FILE_ENUM_TYPE, i as i32]);
        }
        for (i, service) in file.service.iter().enumerate() {
            self.need_comment(format!("service {}", service.name()), vec![FILE_SERVICE, i as i32]);
            for (j, method) in service.method.iter().enumerate() {
                let what = format!("rpc {}.{}", service.name(), method.name());
                self.need_comment(what, vec![FILE_SERVICE, i as i32, SERVICE_METHOD, j as i32]);
            }
        }
    }
}

fn walk() -> (Walk, Vec<FileDescriptorProto>) {
    let files = package_files();
    let mut walk = Walk::default();
    for (i, file) in files.iter().enumerate() {
        walk.file = i;
        walk.file(file);
    }
    (walk, files)
}

/// The snapshot: `Name.member = N` lines; blank lines and `#` comments are skipped.
fn snapshot() -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    for (n, line) in SNAPSHOT.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, number) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("{SNAPSHOT_PATH}:{}: expected `Name.member = N`, got {line:?}", n + 1));
        let number = number
            .parse()
            .unwrap_or_else(|_| panic!("{SNAPSHOT_PATH}:{}: {number:?} is not a number", n + 1));
        assert!(
            out.insert(name.to_owned(), number).is_none(),
            "{SNAPSHOT_PATH}:{}: {name} is listed twice",
            n + 1
        );
    }
    out
}

#[test]
fn field_and_enum_numbers_match_the_snapshot() {
    let (walk, _) = walk();
    let current = walk.numbers;
    let snapshot = snapshot();
    // A retired member keeps its snapshot line, with its number and name `reserved`.
    let retired = |name: &str, number: i32| {
        let Some((container, member)) = name.rsplit_once('.') else { return false };
        walk.reserved.get(container).is_some_and(|(ranges, names)| {
            ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&number)) && names.iter().any(|n| n == member)
        })
    };

    let mut broken = Vec::new();
    for (name, &was) in &snapshot {
        match current.get(name) {
            None if retired(name, was) => {}
            None => broken.push(format!(
                "  {name} = {was} was removed or renamed (a removed field's number and name must be `reserved`, never reused)"
            )),
            Some(&now) if now != was => broken.push(format!("  {name} was renumbered from {was} to {now}")),
            Some(_) => {}
        }
    }
    let added: Vec<String> = current
        .iter()
        .filter(|(name, _)| !snapshot.contains_key(*name))
        .map(|(name, n)| format!("{name} = {n}"))
        .collect();

    let mut message = String::new();
    if !broken.is_empty() {
        message += &format!(
            "the wire contract of {PACKAGE} changed incompatibly; callers' generated stubs would misread it:\n{}\n",
            broken.join("\n")
        );
    }
    if !added.is_empty() {
        message += &format!(
            "new fields or enum values (fine, but record them): add these lines to {SNAPSHOT_PATH} (kept sorted):\n{}\n",
            added.join("\n")
        );
    }
    assert!(message.is_empty(), "{message}");
}

#[test]
fn snapshot_is_sorted() {
    let lines: Vec<&str> =
        SNAPSHOT.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    if let Some(pair) = lines.windows(2).find(|pair| pair[0] >= pair[1]) {
        panic!(
            "{SNAPSHOT_PATH} must be sorted (LC_ALL=C sort) without repeats: {:?} comes before {:?}",
            pair[0], pair[1]
        );
    }
}

#[test]
fn every_enum_zero_value_is_unspecified() {
    let (walk, _) = walk();
    assert!(
        walk.bad_zero.is_empty(),
        "every enum of {PACKAGE} must have a zero value named *_UNSPECIFIED (proto3 sends 0 for unset):\n  {}",
        walk.bad_zero.join("\n  ")
    );
}

#[test]
fn every_declaration_has_a_comment() {
    let (walk, files) = walk();
    let mut comments: BTreeMap<(usize, Vec<i32>), bool> = BTreeMap::new();
    for (i, file) in files.iter().enumerate() {
        for location in file.source_code_info.iter().flat_map(|info| info.location.iter()) {
            let Location { path, leading_comments, trailing_comments, .. } = location;
            let has = |c: &Option<String>| c.as_deref().is_some_and(|c| !c.trim().is_empty());
            *comments.entry((i, path.clone())).or_default() |=
                has(leading_comments) || has(trailing_comments);
        }
    }
    assert!(
        !comments.is_empty(),
        "FILE_DESCRIPTOR_SET carries no source info, so comments cannot be checked"
    );
    let missing: Vec<&str> = walk
        .documented
        .iter()
        .filter(|(_, file, path)| !comments.get(&(*file, path.clone())).copied().unwrap_or(false))
        .map(|(what, _, _)| what.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "these declarations of {PACKAGE} have no comment (say what it is, its units and its default):\n  {}",
        missing.join("\n  ")
    );
}
