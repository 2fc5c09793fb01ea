//! Proto documentation: every declaration of `callout.v1` has a comment.
//!
//! Compatibility (no field renumbered, removed without `reserved`, or retyped) and naming
//! (`*_UNSPECIFIED` zero values, enum prefixes) are buf's: `buf breaking` and `buf lint` with
//! buf.yaml, run by .ci/buf.sh in CI. buf's STANDARD lint does not ask for comments, so this
//! checks them, on the descriptors compiled into the binary (`callout::pb::FILE_DESCRIPTOR_SET`,
//! served by reflection too): what is checked is what callers see.
use callout::pb::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_types::{
    source_code_info::Location, DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
};
use std::collections::BTreeMap;

const PACKAGE: &str = "callout.v1";

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

/// What the walk over one file's declarations collects.
#[derive(Default)]
struct Walk {
    /// (what, file index, SourceCodeInfo path) of every declaration that needs a comment.
    documented: Vec<(String, usize, Vec<i32>)>,
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
        for (i, field) in message.field.iter().enumerate() {
            let key = format!("{name}.{}", field.name());
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
        for (i, value) in e.value.iter().enumerate() {
            let key = format!("{name}.{}", value.name());
            // The zero value of an UNSPECIFIED enum says all it needs in its name.
            if value.number() != 0 {
                self.need_comment(format!("enum value {key}"), [&path[..], &[ENUM_VALUE, i as i32]].concat());
            }
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
