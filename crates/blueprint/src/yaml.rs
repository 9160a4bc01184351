//! A YAML document as a tree of nodes that remember where they came from.
//!
//! serde-based YAML loaders lose positions after parsing; validation needs the
//! line and column of every key and value to report all errors at once, so we
//! build our own tree from `yaml-rust2`'s event stream. The builder is
//! iterative (an explicit stack), so deep nesting cannot overflow the call
//! stack, and alias expansion is bounded so a "billion laughs" document fails
//! instead of exhausting memory.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Largest number of nodes one document may expand to (aliases included).
pub const MAX_NODES: usize = 2_000_000;
/// Deepest nesting of sequences and mappings accepted.
pub const MAX_DEPTH: usize = 256;

/// A position in a source file: 1-based line and column, 0-based char offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
    pub offset: usize,
}

impl Pos {
    fn from_marker(m: &Marker) -> Pos {
        Pos {
            line: m.line(),
            col: m.col() + 1,
            offset: m.index(),
        }
    }

    /// The position `chars` characters further on the same line.
    pub fn shifted(self, chars: usize) -> Pos {
        Pos {
            line: self.line,
            col: self.col + chars,
            offset: self.offset + chars,
        }
    }
}

/// How a scalar was written, which decides how it may be typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Unquoted: `42`, `true` and `~` may mean a number, a boolean or null.
    Plain,
    /// Quoted on one line: always a string; content starts one column in.
    Quoted,
    /// A `|` or `>` block: always a string; content starts on the next line.
    Block,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Scalar(String, Style),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub pos: Pos,
}

impl Node {
    /// True for an unquoted `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar(s, Style::Plain) if s.is_empty() || s == "~" || s == "null")
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar(s, _) => Some(s),
            _ => None,
        }
    }

    /// A short word for the node's shape, used in "expected X, found Y" errors.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar(_, Style::Plain) if self.is_null() => "nothing (null)",
            NodeKind::Scalar(s, Style::Plain) if s == "true" || s == "false" => "a boolean",
            NodeKind::Scalar(s, Style::Plain) if s.parse::<f64>().is_ok() => "a number",
            NodeKind::Scalar(..) => "a string",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a map",
        }
    }
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Seq(Vec<Node>, Pos, usize),
    Map(Vec<(Node, Node)>, Option<Node>, Pos, usize),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    error: Option<SyntaxError>,
}

impl Builder {
    fn fail(&mut self, pos: Pos, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { pos, message });
        }
    }

    fn count(&mut self, n: usize, pos: Pos) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            self.fail(
                pos,
                format!("document expands to more than {MAX_NODES} nodes (too many aliases?)"),
            );
            return false;
        }
        true
    }

    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(items, _, _)) => items.push(node),
            Some(Frame::Map(entries, key, _, _)) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }

    fn anchor(&mut self, id: usize, node: &Node) {
        if id > 0 {
            self.anchors.insert(id, node.clone());
        }
    }
}

fn node_size(node: &Node) -> usize {
    // Iterative so that a deep tree cannot overflow the stack.
    let mut total = 0;
    let mut todo = vec![node];
    while let Some(n) = todo.pop() {
        total += 1;
        match &n.kind {
            NodeKind::Scalar(..) => {}
            NodeKind::Seq(items) => todo.extend(items.iter()),
            NodeKind::Map(entries) => {
                for (k, v) in entries {
                    todo.push(k);
                    todo.push(v);
                }
            }
        }
    }
    total
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let pos = Pos::from_marker(&mark);
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                if !self.count(1, pos) {
                    return;
                }
                let (style, pos) = match style {
                    TScalarStyle::Plain => (Style::Plain, pos),
                    TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => (Style::Quoted, pos),
                    TScalarStyle::Literal | TScalarStyle::Folded => (Style::Block, pos),
                };
                let node = Node {
                    kind: NodeKind::Scalar(value, style),
                    pos,
                };
                self.anchor(anchor, &node);
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                if self.stack.len() >= MAX_DEPTH {
                    return self.fail(pos, format!("nesting deeper than {MAX_DEPTH} levels"));
                }
                self.stack.push(Frame::Seq(Vec::new(), pos, anchor));
            }
            Event::MappingStart(anchor, _) => {
                if self.stack.len() >= MAX_DEPTH {
                    return self.fail(pos, format!("nesting deeper than {MAX_DEPTH} levels"));
                }
                self.stack.push(Frame::Map(Vec::new(), None, pos, anchor));
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq(items, start, anchor)) = self.stack.pop() {
                    if !self.count(1, start) {
                        return;
                    }
                    let node = Node {
                        kind: NodeKind::Seq(items),
                        pos: start,
                    };
                    self.anchor(anchor, &node);
                    self.push_value(node);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map(entries, _, start, anchor)) = self.stack.pop() {
                    if !self.count(1, start) {
                        return;
                    }
                    // A block mapping's start event is marked after its first
                    // key; the first key is where a reader sees the map begin.
                    let pos = match entries.first() {
                        Some((k, _)) if k.pos.offset < start.offset => k.pos,
                        _ => start,
                    };
                    let node = Node {
                        kind: NodeKind::Map(entries),
                        pos,
                    };
                    self.anchor(anchor, &node);
                    self.push_value(node);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    if !self.count(node_size(&node), pos) {
                        return;
                    }
                    node.pos = pos;
                    self.push_value(node);
                }
                None => self.fail(pos, "alias refers to an unknown anchor".into()),
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Parses the first YAML document of `source`. An empty document is `None`.
pub fn parse(source: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(source);
    if let Err(e) = parser.load(&mut builder, false) {
        return Err(SyntaxError {
            pos: Pos::from_marker(e.marker()),
            message: e.info().to_string(),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let root = parse("name: x\ncomponents:\n  web: {process: y}\n")
            .unwrap()
            .unwrap();
        let NodeKind::Map(entries) = &root.kind else {
            panic!("expected map")
        };
        assert_eq!(
            entries[0].0.pos,
            Pos {
                line: 1,
                col: 1,
                offset: 0
            }
        );
        let NodeKind::Map(comps) = &entries[1].1.kind else {
            panic!()
        };
        assert_eq!((comps[0].0.pos.line, comps[0].0.pos.col), (3, 3));
        assert_eq!((root.pos.line, root.pos.col), (1, 1));
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let err = parse(&doc).unwrap_err();
        assert!(err.message.contains("more than"), "{}", err.message);
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("a: [b\nc: d").unwrap_err();
        assert_eq!(err.pos.line, 2);
    }
}
