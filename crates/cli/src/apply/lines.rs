//! Where each declared resource and field is in the file, for `FILE:LINE`
//! in error messages.
//!
//! serde_yaml gives typed values but no positions, so the file is read a
//! second time with a YAML parser that reports a position for every event
//! (`saphyr-parser`). The positions therefore follow YAML itself: block
//! and flow style, anchors and aliases, comments and multi-line scalars
//! all land on the right line, where an indentation scanner would guess.
//! An entry that is an alias (`- *base`) is located, fields and all, at
//! the alias (it repeats an entry, so that is where the error is); a field
//! inside an entry whose value is an alias (`placement: *pin`) is located
//! where the anchored value writes it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use saphyr_parser::{Event, Parser, ScanError, Span};

/// The positions the file's top-level sections, their list entries and the
/// entries' fields have.
pub(super) struct Lines {
    pub(super) file: String,
    /// Section name → line of its key (1-based).
    sections: BTreeMap<String, usize>,
    /// Section name → its list entries, in order.
    items: BTreeMap<String, Vec<Entry>>,
}

/// One list entry: its line, and its fields' keys with their lines
/// (top-level keys first, then nested ones, each in document order).
struct Entry {
    line: usize,
    fields: Vec<(String, usize)>,
}

/// A parsed node with the line it starts on.
#[derive(Clone)]
struct Node {
    line: usize,
    kind: Kind,
    /// Written as an alias (`*name`) of an anchored node.
    alias: bool,
}

#[derive(Clone)]
enum Kind {
    Scalar(String),
    Seq(Vec<Node>),
    /// Key (a scalar's text, else empty), the key's line, the value.
    Map(Vec<(String, usize, Node)>),
}

impl Lines {
    /// The positions in `text`. A file the position parser cannot read
    /// (serde_yaml reports its syntax errors first) locates nothing: errors
    /// then name the file only.
    pub(super) fn new(file: &Path, text: &str) -> Lines {
        let mut lines = Lines {
            file: file.display().to_string(),
            sections: BTreeMap::new(),
            items: BTreeMap::new(),
        };
        let Ok(Some(root)) = parse(text) else {
            return lines;
        };
        let Kind::Map(sections) = root.kind else {
            return lines;
        };
        for (key, key_line, value) in sections {
            lines.sections.insert(key.clone(), key_line);
            if let Kind::Seq(entries) = value.kind {
                let entries = entries
                    .iter()
                    .map(|e| Entry {
                        line: e.line,
                        // A whole entry written as an alias repeats another
                        // one: its fields are reported where it is written.
                        fields: match e.alias {
                            true => fields_of(e).into_iter().map(|(k, _)| (k, e.line)).collect(),
                            false => fields_of(e),
                        },
                    })
                    .collect();
                lines.items.insert(key, entries);
            }
        }
        lines
    }

    /// `FILE:LINE` of an entry, or of the line of `field` in it when found.
    pub(super) fn at(&self, section: &str, index: usize, field: Option<&str>) -> String {
        let Some(entry) = self.items.get(section).and_then(|v| v.get(index)) else {
            return self.section(section);
        };
        let line = field
            .and_then(|f| entry.fields.iter().find(|(k, _)| k == f))
            .map(|(_, l)| *l)
            .unwrap_or(entry.line);
        format!("{}:{line}", self.file)
    }

    /// `FILE:LINE` of a section's key, or `FILE` when it is not there.
    pub(super) fn section(&self, section: &str) -> String {
        match self.sections.get(section) {
            Some(l) => format!("{}:{l}", self.file),
            None => self.file.clone(),
        }
    }
}

/// The keys of a mapping node with their lines: its own first, then those
/// of nested mappings (a field such as `country` may sit in `placement`).
fn fields_of(node: &Node) -> Vec<(String, usize)> {
    let mut own = Vec::new();
    let mut nested = Vec::new();
    if let Kind::Map(pairs) = &node.kind {
        for (k, line, v) in pairs {
            own.push((k.clone(), *line));
            nested.extend(nested_keys(v));
        }
    }
    own.extend(nested);
    own
}

fn nested_keys(node: &Node) -> Vec<(String, usize)> {
    match &node.kind {
        Kind::Scalar(_) => Vec::new(),
        Kind::Seq(items) => items.iter().flat_map(nested_keys).collect(),
        Kind::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, line, v)| std::iter::once((k.clone(), *line)).chain(nested_keys(v)))
            .collect(),
    }
}

/// The first document's root node, if the text has one.
fn parse(text: &str) -> Result<Option<Node>, ScanError> {
    let mut b = Builder {
        events: Parser::new_from_str(text),
        anchors: HashMap::new(),
    };
    loop {
        match b.next()? {
            None | Some((Event::StreamEnd, _)) => return Ok(None),
            Some((Event::StreamStart | Event::DocumentStart(_), _)) => continue,
            Some(first) => return b.node(first).map(Some),
        }
    }
}

/// Builds nodes from the parser's events, keeping anchored nodes for
/// their aliases.
struct Builder<'a> {
    events: Parser<'a, saphyr_parser::StrInput<'a>>,
    anchors: HashMap<usize, Node>,
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<Option<(Event<'a>, Span)>, ScanError> {
        self.events.next().transpose()
    }

    /// The node that starts with `first`. Unbalanced events (which the
    /// parser does not produce) end the node where they stand.
    fn node(&mut self, first: (Event<'a>, Span)) -> Result<Node, ScanError> {
        let (event, span) = first;
        let line = span.start.line();
        let (node, anchor) = match event {
            Event::Alias(id) => {
                let kind = self
                    .anchors
                    .get(&id)
                    .map(|n| n.kind.clone())
                    .unwrap_or(Kind::Scalar(String::new()));
                return Ok(Node {
                    line,
                    kind,
                    alias: true,
                });
            }
            Event::Scalar(v, _, anchor, _) => (
                Node {
                    line,
                    kind: Kind::Scalar(v.into_owned()),
                    alias: false,
                },
                anchor,
            ),
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                while let Some(e) = self.next()? {
                    if matches!(e.0, Event::SequenceEnd | Event::StreamEnd) {
                        break;
                    }
                    items.push(self.node(e)?);
                }
                let kind = Kind::Seq(items);
                (
                    Node {
                        line,
                        kind,
                        alias: false,
                    },
                    anchor,
                )
            }
            Event::MappingStart(anchor, _) => (self.mapping(line)?, anchor),
            _ => (
                Node {
                    line,
                    kind: Kind::Scalar(String::new()),
                    alias: false,
                },
                0,
            ),
        };
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }

    /// A mapping's pairs, up to its end; it starts on `line`.
    fn mapping(&mut self, line: usize) -> Result<Node, ScanError> {
        let mut pairs = Vec::new();
        while let Some(e) = self.next()? {
            if matches!(e.0, Event::MappingEnd | Event::StreamEnd) {
                break;
            }
            let key = self.node(e)?;
            let Some(v) = self.next()? else { break };
            let value = self.node(v)?;
            let name = match key.kind {
                Kind::Scalar(s) => s,
                _ => String::new(),
            };
            pairs.push((name, key.line, value));
        }
        Ok(Node {
            line,
            kind: Kind::Map(pairs),
            alias: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Lines {
        Lines::new(Path::new("f.yaml"), text)
    }

    #[test]
    fn block_style_entries_and_fields() {
        let l = lines("providers:\n  - name: a\n    country: DE\n  - name: b\n    country: XX\nvms:\n- name: v\n  image: i\n");
        assert_eq!(l.at("providers", 1, Some("country")), "f.yaml:5");
        assert_eq!(l.at("providers", 0, None), "f.yaml:2");
        assert_eq!(l.at("vms", 0, Some("image")), "f.yaml:8");
        assert_eq!(l.section("vms"), "f.yaml:6");
        // An entry that is not there: its section; a section that is not there: the file.
        assert_eq!(l.at("vms", 3, Some("image")), "f.yaml:6");
        assert_eq!(l.at("sites", 0, None), "f.yaml");
    }

    #[test]
    fn flow_style_is_located_by_the_parser() {
        let l = lines("vms: [{name: a, image: x, memory_mib: 0}]\n");
        assert_eq!(l.at("vms", 0, Some("memory_mib")), "f.yaml:1");
        let l = lines(
            "# two VMs\nvms: [\n  {name: a, image: x},\n  {name: b,\n   image: x,\n   memory_mib: 0}]\n",
        );
        assert_eq!(l.at("vms", 0, Some("image")), "f.yaml:3");
        assert_eq!(l.at("vms", 1, None), "f.yaml:4");
        assert_eq!(l.at("vms", 1, Some("memory_mib")), "f.yaml:6");
    }

    #[test]
    fn nested_fields_come_after_the_entrys_own() {
        let l = lines("sites:\n  - name: s\n    labels: {country: x}\n    country: DE\n    facts:\n      pue: 0\n");
        assert_eq!(l.at("sites", 0, Some("country")), "f.yaml:4");
        assert_eq!(l.at("sites", 0, Some("pue")), "f.yaml:6");
    }

    #[test]
    fn anchors_and_aliases() {
        let text = "vms:\n  - &base\n    name: a\n    image: x\n  - name: b\n    image: x\n    placement: &pin\n      country: DE\n  - *base\n  - name: c\n    image: x\n    placement: *pin\n";
        let l = lines(text);
        // The alias entry is where it is written, and so are its fields;
        // fields inside an aliased value are where the anchor wrote them.
        assert_eq!(l.at("vms", 0, Some("image")), "f.yaml:4");
        assert_eq!(l.at("vms", 2, None), "f.yaml:9");
        assert_eq!(l.at("vms", 2, Some("name")), "f.yaml:9");
        assert_eq!(l.at("vms", 3, Some("placement")), "f.yaml:12");
        assert_eq!(l.at("vms", 3, Some("country")), "f.yaml:8");
    }

    #[test]
    fn unreadable_files_locate_nothing() {
        let l = lines("vms: [\n");
        assert_eq!(l.at("vms", 0, Some("name")), "f.yaml");
    }
}
