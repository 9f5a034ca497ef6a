//! The documents that describe the contract, checked against it: the
//! protocol page's tables name every enum value of the `.proto` files with
//! its number, and the README shows the sketches that the interop tests run,
//! as they are.

use std::{collections::HashSet, fs, path::Path};

use prost::Message;
use prost_types::FileDescriptorSet;
use tonic_heartbeat::protocol::pb::FILE_DESCRIPTOR_SET;

fn read(path: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|error| panic!("read {path}: {error}"))
}

/// The `(name, number)` of every table row that starts ``| `NAME` | N |``.
fn table_rows(page: &str) -> HashSet<(String, i32)> {
    page.lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let number = cells.next()?.parse().ok()?;
            Some((name.to_owned(), number))
        })
        .collect()
}

/// Tests that `proto/README.md` has a table row for every enum value.
#[test]
fn the_protocol_page_tables_name_every_enum_value() {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("the descriptor set");
    let rows = table_rows(&read("proto/README.md"));
    let mut values = Vec::new();
    for file in set
        .file
        .iter()
        .filter(|file| file.package() == "heartbeat.v1")
    {
        let nested = file
            .message_type
            .iter()
            .flat_map(|message| &message.enum_type);
        for enumeration in file.enum_type.iter().chain(nested) {
            values.extend(
                enumeration
                    .value
                    .iter()
                    .map(|value| (value.name().to_owned(), value.number())),
            );
        }
    }
    assert!(values.len() >= 20, "the enums were found: {values:?}");
    let missing: Vec<_> = values
        .iter()
        .filter(|value| !rows.contains(value))
        .collect();
    assert!(
        missing.is_empty(),
        "proto/README.md needs a table row \"| `NAME` | NUMBER | …\" for each of {missing:?}"
    );
}

/// Tests that the README shows each sketch file exactly as the tests run it.
#[test]
fn the_readme_shows_the_sketches_the_tests_run() {
    let readme = read("README.md");
    for sketch in ["interop/python/sketch.py", "interop/node/sketch.js"] {
        assert!(
            readme.contains(&read(sketch)),
            "README.md should show {sketch} as it is; copy the file into its code block"
        );
    }
}
