//! NCCL's reading of a topology file, replayed on its text: the tokenizer with its limits (253
//! bytes a value, 16 attributes an element, 640 children, and the element limit counted the way
//! its loader counts, before every read, closing tags included), which element it takes inside
//! which, room for what it adds in each process, and the attributes its topology code requires
//! of each element it builds from. Every export passes it before it is returned; the tests run
//! it on every fixture.
//!
//! Owns: `check`, `Checked`, `Problem`, `Rule`. Must not: know peermem's topology (it reads
//! the text only) or accept a file NCCL refuses.

use std::collections::BTreeMap;

use super::{NCCL_MAX_ATTRS, NCCL_MAX_CHILDREN, NCCL_MAX_ELEMENTS, NCCL_MAX_VALUE_BYTES, RESERVED_AT_RUN_TIME};
use crate::pci::Bdf;

/// Which of NCCL's rules a problem breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The tokenizer refuses the text (it stops there).
    Syntax,
    /// More elements than the parser holds.
    ElementLimit,
    /// Too few elements left for what NCCL adds to the tree at run time.
    RunTimeRoom,
    /// A value longer than the tokenizer takes.
    ValueLength,
    /// More attributes than an element keeps (the rest are dropped).
    AttributeCount,
    /// More children than an element holds.
    ChildCount,
    /// An element NCCL ignores where it stands, or an attribute it never reads.
    Ignored,
    /// An attribute NCCL's topology code requires is missing or malformed.
    Required,
    /// Two elements NCCL tells apart by one value carry the same one.
    Duplicate,
}

/// One rule broken, with the element it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub rule: Rule,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.rule, self.message)
    }
}

/// What the check found: the element count as NCCL's loader counts it, and every problem.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    pub elements: usize,
    /// Elements NCCL adds in each process: its GPU's, plus a `net` for each `nic` without one.
    pub added_at_run_time: usize,
    pub problems: Vec<Problem>,
}

impl Checked {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Whether some problem breaks `rule`.
    pub fn breaks(&self, rule: Rule) -> bool {
        self.problems.iter().any(|p| p.rule == rule)
    }
}

/// The elements NCCL's loader takes inside each element (top level: `system`).
fn handlers(parent: Option<&str>) -> &'static [&'static str] {
    match parent {
        None => &["system"],
        Some("system") => &["cpu"],
        Some("cpu") => &["pci", "nic"],
        Some("pci") => &["pci", "gpu", "nic", "pcilink"],
        Some("nic") => &["net"],
        Some("gpu") => &["nvlink", "c2c"],
        _ => &[],
    }
}

/// The attributes NCCL reads of each element (any other one it carries but never uses).
fn read_attrs(name: &str) -> &'static [&'static str] {
    match name {
        "system" => &["version", "name"],
        "cpu" => &["numaid", "affinity", "affinity_offset", "arch", "vendor", "familyid", "modelid", "host_hash"],
        "pci" => {
            &["busid", "class", "vendor", "device", "subsystem_vendor", "subsystem_device", "link_speed", "link_width"]
        }
        "net" => &[
            "name", "dev", "speed", "port", "latency", "guid", "maxconn", "gdr", "coll", "rail", "plane", "net", "keep",
        ],
        "gpu" => &["dev", "sm", "rank", "gdr", "mlopart", "keep"],
        "nvlink" => &["target", "count", "tclass"],
        "c2c" => &["bw", "count"],
        "pcilink" => &["target"],
        _ => &[],
    }
}

/// The `link_speed` values NCCL's table knows (matched as prefixes), and the empty value it
/// writes itself when sysfs gives none.
const LINK_SPEEDS: &[&str] = &[
    "2.5 GT/s",
    "5 GT/s",
    "8 GT/s",
    "16 GT/s",
    "32 GT/s",
    "5.0 GT/s PCIe",
    "8.0 GT/s PCIe",
    "16.0 GT/s PCIe",
    "32.0 GT/s PCIe",
    "64.0 GT/s PCIe",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Open,
    Close,
    Single,
}

#[derive(Debug)]
struct Tag {
    kind: Kind,
    name: String,
    attrs: Vec<(String, String)>,
}

/// One element as read, with its place in the tree.
#[derive(Debug)]
struct El {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<usize>,
}

impl El {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    fn describe(&self) -> String {
        match self.attr("busid").or(self.attr("name")).or(self.attr("numaid")) {
            Some(id) => format!("<{} {id}>", self.name),
            None => format!("<{}>", self.name),
        }
    }
}

fn problem(rule: Rule, message: impl Into<String>) -> Problem {
    Problem { rule, message: message.into() }
}

/// The tokenizer, byte for byte: names end at a space, `>`, `/`, or a line break; values are
/// double-quoted; no entity is decoded.
struct Reader<'a> {
    text: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, Problem> {
        let c = *self.text.get(self.at).ok_or_else(|| problem(Rule::Syntax, "unexpected end of file"))?;
        self.at += 1;
        Ok(c)
    }

    /// A name up to its terminator (returned too), or up to `=` (then `Some(value)`).
    fn token(&mut self, want_value: bool) -> Result<(String, Option<String>, u8), Problem> {
        let mut name = Vec::new();
        loop {
            let c = self.byte()?;
            if c == b'=' {
                let name = String::from_utf8_lossy(&name).into_owned();
                if !want_value {
                    return Err(problem(Rule::Syntax, format!("unexpected value after name {name:?}")));
                }
                let (value, last) = self.value(&name)?;
                return Ok((name, Some(value), last));
            }
            if matches!(c, b' ' | b'>' | b'/' | b'\n' | b'\r') {
                return Ok((String::from_utf8_lossy(&name).into_owned(), None, c));
            }
            name.push(c);
            if name.len() > NCCL_MAX_VALUE_BYTES {
                return Err(problem(Rule::ValueLength, format!("a name over {NCCL_MAX_VALUE_BYTES} bytes")));
            }
        }
    }

    fn value(&mut self, key: &str) -> Result<(String, u8), Problem> {
        if self.byte()? != b'"' {
            return Err(problem(Rule::Syntax, format!("value of {key} must be double-quoted")));
        }
        let mut v = Vec::new();
        loop {
            let c = self.byte()?;
            if c == b'"' {
                break;
            }
            v.push(c);
            if v.len() > NCCL_MAX_VALUE_BYTES {
                let shown = String::from_utf8_lossy(&v[..40]);
                return Err(problem(
                    Rule::ValueLength,
                    format!("value of {key} ({shown}...) is over NCCL's {NCCL_MAX_VALUE_BYTES} bytes"),
                ));
            }
        }
        Ok((String::from_utf8_lossy(&v).into_owned(), self.byte()?))
    }

    /// The next tag, or `None` at the end of the text.
    fn tag(&mut self) -> Result<Option<Tag>, Problem> {
        while matches!(self.text.get(self.at), Some(b' ' | b'\n' | b'\r')) {
            self.at += 1;
        }
        if self.at == self.text.len() {
            return Ok(None);
        }
        if self.byte()? != b'<' {
            return Err(problem(Rule::Syntax, format!("expected '<' at byte {}", self.at - 1)));
        }
        let (name, _, mut c) = self.token(false)?;
        if name.starts_with("!--") {
            return Err(problem(Rule::Syntax, "a comment: older NCCL parsers do not skip them"));
        }
        if name.is_empty() && c == b'/' {
            let (name, _, c) = self.token(false)?;
            if c != b'>' {
                return Err(problem(Rule::Syntax, format!("unexpected {:?} in closing tag {name}", c as char)));
            }
            return Ok(Some(Tag { kind: Kind::Close, name, attrs: Vec::new() }));
        }
        let mut attrs = Vec::new();
        while c == b' ' {
            let (k, v, last) = self.token(true)?;
            let v = v.ok_or_else(|| problem(Rule::Syntax, format!("<{name}>: attribute {k:?} without a value")))?;
            attrs.push((k, v));
            c = last;
        }
        let mut kind = Kind::Open;
        if c == b'/' {
            kind = Kind::Single;
            c = self.token(false)?.2;
        }
        if c != b'>' {
            return Err(problem(Rule::Syntax, format!("<{name}>: expected '>', got {:?}", c as char)));
        }
        Ok(Some(Tag { kind, name, attrs }))
    }
}

/// The loader: elements in the tree, counted as NCCL counts them (an ignored element and its
/// subtree are read but not kept).
struct Loader<'a> {
    reader: Reader<'a>,
    els: Vec<El>,
    problems: Vec<Problem>,
}

impl Loader<'_> {
    /// Reads the children of `head` (the top level when `None`) up to its closing tag. `keep` is
    /// false inside an ignored element: its name only is known then.
    fn load(&mut self, head: Option<usize>, ignored: Option<&str>, depth: usize) -> Result<(), Problem> {
        // Kept elements bound the depth of what is kept; ignored ones could nest without end.
        if depth > NCCL_MAX_ELEMENTS {
            return Err(problem(Rule::Syntax, format!("elements nested over {NCCL_MAX_ELEMENTS} deep")));
        }
        let parent = ignored.map(str::to_string).or_else(|| head.map(|h| self.els[h].name.clone()));
        loop {
            if self.els.len() == NCCL_MAX_ELEMENTS {
                return Err(problem(Rule::ElementLimit, format!("NCCL's parser holds {NCCL_MAX_ELEMENTS} elements")));
            }
            let Some(tag) = self.reader.tag()? else {
                return match parent {
                    Some(p) => Err(problem(Rule::Syntax, format!("unterminated <{p}>"))),
                    None => Ok(()),
                };
            };
            if tag.kind == Kind::Close {
                return match &parent {
                    Some(p) if *p == tag.name => Ok(()),
                    p => Err(problem(
                        Rule::Syntax,
                        format!("</{}> closes <{}>", tag.name, p.clone().unwrap_or_default()),
                    )),
                };
            }
            if ignored.is_some() || !handlers(parent.as_deref()).contains(&tag.name.as_str()) {
                if ignored.is_none() {
                    let inside = parent.as_ref().map(|p| format!("inside <{p}>")).unwrap_or("at the top".into());
                    self.problems.push(problem(Rule::Ignored, format!("NCCL ignores <{}> {inside}", tag.name)));
                }
                if tag.kind == Kind::Open {
                    self.load(None, Some(&tag.name), depth + 1)?;
                }
                continue;
            }
            let i = self.els.len();
            if let Some(h) = head {
                if self.els[h].children.len() == NCCL_MAX_CHILDREN {
                    let at = self.els[h].describe();
                    return Err(problem(Rule::ChildCount, format!("{at} holds {NCCL_MAX_CHILDREN} children")));
                }
                self.els[h].children.push(i);
            }
            self.els.push(El { name: tag.name, attrs: tag.attrs, children: Vec::new() });
            if tag.kind == Kind::Open {
                self.load(Some(i), None, depth + 1)?;
            }
        }
    }
}

/// Checks `xml` the way NCCL reads a topology file. Reading stops at the first problem NCCL
/// stops at; the rules of its topology code are checked only on a file it reads through.
pub fn check(xml: &str) -> Checked {
    let mut l = Loader { reader: Reader { text: xml.as_bytes(), at: 0 }, els: Vec::new(), problems: Vec::new() };
    let stopped = l.load(None, None, 0).err();
    let mut out = Checked { elements: l.els.len(), problems: l.problems, ..Checked::default() };
    match stopped {
        Some(p) => out.problems.push(p),
        None => rules(&l.els, &mut out),
    }
    out
}

/// The rules NCCL's topology code applies to the elements it read.
fn rules(els: &[El], out: &mut Checked) {
    let mut busids: BTreeMap<&str, usize> = BTreeMap::new();
    let mut nets: BTreeMap<&str, usize> = BTreeMap::new();
    let cpus = els.iter().filter(|e| e.name == "cpu").count();
    let tops = els.iter().filter(|e| e.name == "system").count();
    if tops != 1 {
        out.problems.push(problem(Rule::Required, format!("{tops} <system> elements, NCCL needs one")));
    }
    let mut added = RESERVED_AT_RUN_TIME;
    for e in els {
        if e.attrs.len() > NCCL_MAX_ATTRS {
            out.problems
                .push(problem(Rule::AttributeCount, format!("{} has {} attributes", e.describe(), e.attrs.len())));
        }
        for (k, _) in &e.attrs {
            if !read_attrs(&e.name).contains(&k.as_str()) {
                out.problems.push(problem(Rule::Ignored, format!("{}: NCCL never reads {k}", e.describe())));
            }
        }
        match e.name.as_str() {
            "system" if e.attr("version") != Some("1") => {
                out.problems.push(problem(Rule::Required, "<system> needs version=\"1\""));
            }
            "cpu" => cpu_rules(e, cpus, out),
            "pci" => {
                pci_rules(e, out);
                if let Some(b) = e.attr("busid") {
                    *busids.entry(b).or_default() += 1;
                }
            }
            "nic" if !e.children.iter().any(|&c| els[c].name == "net") => added += 1,
            "net" => {
                required_int(e, "dev", out);
                match e.attr("name") {
                    Some(n) if !n.is_empty() => *nets.entry(n).or_default() += 1,
                    _ => out.problems.push(problem(Rule::Required, format!("{}: no name to find it by", e.describe()))),
                }
            }
            _ => {}
        }
    }
    for (what, seen) in [("bus id", &busids), ("net name", &nets)] {
        for (v, n) in seen.iter().filter(|(_, n)| **n > 1) {
            out.problems.push(problem(Rule::Duplicate, format!("{n} elements carry {what} {v}: NCCL finds the first")));
        }
    }
    out.added_at_run_time = added;
    if out.elements + added > NCCL_MAX_ELEMENTS {
        out.problems.push(problem(
            Rule::RunTimeRoom,
            format!("{} elements leave no room for the {added} NCCL adds (limit {NCCL_MAX_ELEMENTS})", out.elements),
        ));
    }
}

fn required_int(e: &El, k: &str, out: &mut Checked) {
    match e.attr(k) {
        Some(v) if v.trim().parse::<i64>().is_ok() => {}
        Some(v) => out.problems.push(problem(Rule::Required, format!("{}: {k}={v:?} is not an integer", e.describe()))),
        None => out.problems.push(problem(Rule::Required, format!("{}: no {k}", e.describe()))),
    }
}

/// NCCL fills a CPU's architecture, vendor and family/model from the machine it runs on, but
/// only for the CPU above its own GPU (and family and model only together, when the family is
/// absent): with several CPUs each needs them written; with one, both or neither.
fn cpu_rules(e: &El, cpus: usize, out: &mut Checked) {
    required_int(e, "numaid", out);
    let mut need = |k: &str| {
        if cpus > 1 && e.attr(k).is_none() {
            out.problems
                .push(problem(Rule::Required, format!("{}: no {k}, and NCCL fills it only for one CPU", e.describe())));
        }
    };
    need("arch");
    if e.attr("arch") == Some("x86_64") {
        need("vendor");
        match e.attr("vendor") {
            Some("GenuineIntel" | "CentaurHauls" | "  Shanghai  ") => {
                need("familyid");
                need("modelid");
            }
            Some("AuthenticAMD") => need("familyid"),
            _ => {}
        }
    }
    if e.attr("familyid").is_some() != e.attr("modelid").is_some() {
        out.problems
            .push(problem(Rule::Required, format!("{}: familyid and modelid come both or neither", e.describe())));
    }
}

fn pci_rules(e: &El, out: &mut Checked) {
    match e.attr("busid") {
        Some(b) if b.parse::<Bdf>().is_ok() && b == b.to_lowercase() => {}
        b => out.problems.push(problem(Rule::Required, format!("<pci>: busid {b:?} is not a lower-case PCI address"))),
    }
    if e.attr("class").is_none_or(|c| !c.starts_with("0x")) {
        out.problems.push(problem(Rule::Required, format!("{}: no class", e.describe())));
    }
    required_int(e, "link_width", out);
    match e.attr("link_speed") {
        Some(s) if s.is_empty() || LINK_SPEEDS.iter().any(|k| s.starts_with(k)) => {}
        Some(s) => {
            out.problems.push(problem(Rule::Required, format!("{}: link_speed {s:?} unknown to NCCL", e.describe())))
        }
        None => out.problems.push(problem(Rule::Required, format!("{}: no link_speed", e.describe()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "<system version=\"1\" name=\"t\">\n  <cpu numaid=\"0\" arch=\"x86_64\" vendor=\"GenuineIntel\" familyid=\"6\" modelid=\"143\">\n    <pci busid=\"0000:3b:00.0\" class=\"0x020000\" link_speed=\"16.0 GT/s PCIe\" link_width=\"16\">\n      <nic>\n        <net name=\"mlx5_0\" dev=\"0\"/>\n      </nic>\n    </pci>\n  </cpu>\n</system>\n";

    #[test]
    fn a_well_formed_file_passes_and_counts_its_elements() {
        let c = check(GOOD);
        assert!(c.is_ok(), "{:?}", c.problems);
        assert_eq!(c.elements, 5);
        assert_eq!(c.added_at_run_time, RESERVED_AT_RUN_TIME);
    }

    #[test]
    fn the_tokenizer_stops_where_nccls_does() {
        for (text, rule) in [
            ("<system version='1'/>", Rule::Syntax),
            ("<system version=\"1\"><cpu numaid=\"0\"></system>", Rule::Syntax),
            ("<system version=\"1\"><!-- x --></system>", Rule::Syntax),
            ("<system version=\"1\" name>", Rule::Syntax),
            ("x<system/>", Rule::Syntax),
            (format!("<system version=\"1\">{}", "<x>".repeat(100_000)).as_str(), Rule::Syntax),
        ] {
            let c = check(text);
            assert!(c.breaks(rule), "{text}: {:?}", c.problems);
        }
    }

    #[test]
    fn a_value_of_254_bytes_is_refused_and_253_taken() {
        let with = |n: usize| format!("<system version=\"1\" name=\"{}\"/>", "é".repeat(n / 2) + &"a".repeat(n % 2));
        assert!(check(&with(253)).is_ok(), "{:?}", check(&with(253)).problems);
        assert!(check(&with(254)).breaks(Rule::ValueLength));
    }

    #[test]
    fn the_element_limit_counts_before_every_read() {
        let nets = |n: usize| {
            let mut s = String::from("<system version=\"1\"><cpu numaid=\"0\" arch=\"arm64\"><nic>");
            for i in 0..n {
                s += &format!("<net name=\"n{i}\" dev=\"{i}\"/>");
            }
            s + "</nic></cpu></system>"
        };
        // system + cpu + nic + n nets: 256 elements are refused at the closing tag, 255 parse
        // but leave no room for what NCCL adds.
        assert!(check(&nets(253)).breaks(Rule::ElementLimit));
        let c = check(&nets(252));
        assert_eq!(c.elements, 255);
        assert!(!c.breaks(Rule::ElementLimit) && c.breaks(Rule::RunTimeRoom), "{:?}", c.problems);
        assert!(check(&nets(256 - 3 - RESERVED_AT_RUN_TIME)).is_ok());
        assert!(check(&nets(256 - 3 - RESERVED_AT_RUN_TIME + 1)).breaks(Rule::RunTimeRoom));
    }

    #[test]
    fn required_attributes_follow_nccls_topology_code() {
        let cases = [
            (GOOD.replace(" link_width=\"16\"", ""), "no link_width"),
            (GOOD.replace(" link_speed=\"16.0 GT/s PCIe\"", ""), "no link_speed"),
            (GOOD.replace(" modelid=\"143\"", ""), "both or neither"),
            (GOOD.replace("0000:3b:00.0", "0000:3B:00.0"), "lower-case"),
            (GOOD.replace(" dev=\"0\"", ""), "no dev"),
            (GOOD.replace("name=\"mlx5_0\" ", ""), "no name"),
            (GOOD.replace(" numaid=\"0\"", ""), "no numaid"),
            (GOOD.replace("version=\"1\"", "version=\"2\""), "version"),
        ];
        for (text, want) in cases {
            let c = check(&text);
            assert!(
                c.problems.iter().any(|p| p.rule == Rule::Required && p.message.contains(want)),
                "{want}: {:?}",
                c.problems
            );
        }
    }

    #[test]
    fn cpu_facts_are_needed_on_every_cpu_when_nccl_fills_only_one() {
        let one = GOOD.replace(" familyid=\"6\" modelid=\"143\"", "");
        assert!(check(&one).is_ok(), "one CPU: NCCL fills the pair: {:?}", check(&one).problems);
        let two = one.replace("</system>", "  <cpu numaid=\"1\" arch=\"x86_64\" vendor=\"GenuineIntel\"/>\n</system>");
        let c = check(&two);
        assert!(c.problems.iter().any(|p| p.message.contains("no familyid")), "{:?}", c.problems);
    }

    #[test]
    fn duplicates_ignored_elements_and_empty_nics_are_reported() {
        let dup = GOOD.replace(
            "</cpu>",
            "  <pci busid=\"0000:3b:00.0\" class=\"0x030000\" link_speed=\"\" link_width=\"0\"/>\n  </cpu>",
        );
        assert!(check(&dup).breaks(Rule::Duplicate));
        let ignored = GOOD.replace("<nic>", "<nic>\n        <port/>");
        assert!(check(&ignored).breaks(Rule::Ignored));
        let attr = GOOD.replace(" dev=\"0\"", " dev=\"0\" colour=\"red\"");
        assert!(check(&attr).breaks(Rule::Ignored));
        let empty = GOOD.replace("<nic>\n        <net name=\"mlx5_0\" dev=\"0\"/>\n      </nic>", "<nic/>");
        let c = check(&empty);
        assert!(c.is_ok(), "{:?}", c.problems);
        assert_eq!(c.added_at_run_time, RESERVED_AT_RUN_TIME + 1, "NCCL adds a net to an empty nic");
    }
}
