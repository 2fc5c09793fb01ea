//! `paginate`: walking a paginated collection. Validated settings (`Paginate`), what a page's
//! response says about the next page (`Paginate::next_page`) and its items (`Paginate::items`),
//! and the action that requests the next page (`HttpAction::next_page`). Pure: no I/O.
use super::{
    excerpt::excerpt,
    extract::{nesting, unquoted, MAX_EXTRACT_PATH_LEN},
    HttpAction, InvalidAction,
};
use serde_json::Value;
use serde_json_path::JsonPath;
use std::collections::HashSet;

/// Pages fetched when `max_pages` is unset.
pub const DEFAULT_MAX_PAGES: u32 = 10;
/// Most pages an action may ask for.
pub const MAX_MAX_PAGES: u32 = 1_000;
/// Longest cursor query parameter name, bytes.
pub const MAX_CURSOR_PARAM_LEN: usize = 256;
/// Deepest nesting of brackets in a path (as `extract`'s bound, for the same reason).
const MAX_PATH_NESTING: usize = 16;
/// Longest next URL or cursor taken from a response: longer ones end pagination as invalid.
const MAX_NEXT_LEN: usize = 8 * 1024;

/// `paginate` as written; `None` for no pagination.
#[derive(Debug, Clone, Default)]
pub struct PaginateInput {
    pub next: NextInput,
    /// Empty: the body itself when it is an array.
    pub items_path: String,
    /// `None`: `DEFAULT_MAX_PAGES`.
    pub max_pages: Option<u32>,
}

/// Where the next page comes from, as written.
#[derive(Debug, Clone, Default)]
pub enum NextInput {
    /// The `Link` header's rel="next" (also the default).
    #[default]
    LinkHeader,
    /// `link_header: false`: set but not true, refused.
    LinkHeaderFalse,
    /// A JSONPath to the next URL in the body.
    UrlPath(String),
    /// A JSONPath to a cursor, written into the query parameter `param`.
    Cursor { path: String, param: String },
}

/// Validated pagination.
#[derive(Debug, Clone)]
pub struct Paginate {
    next: Next,
    items_path: Option<JsonPath>,
    /// `items_path` names at most one node (RFC 9535's singular query): an array it selects
    /// is the items, not one item.
    items_singular: bool,
    max_pages: u32,
}

#[derive(Debug, Clone)]
enum Next {
    LinkHeader,
    UrlPath(JsonPath),
    Cursor { path: JsonPath, param: String },
}

/// What a page says comes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextPage {
    /// Request this URL (already resolved against the page's URL) with GET.
    Url(url::Url),
    /// Request the action again with its cursor parameter set to this.
    Cursor(String),
    /// The page is the last one.
    None,
    /// The page named a next page that cannot be requested (not http(s), too long): the
    /// message says why.
    Invalid(String),
}

/// Why pagination stopped, for the last page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaginationEnd {
    LastPage,
    MaxPages,
    /// The next URL or cursor had been requested already.
    Loop,
    /// The items reached the cap.
    ItemsCapped,
}

impl Paginate {
    /// The most pages fetched, page 1 included.
    pub fn max_pages(&self) -> u32 {
        self.max_pages
    }

    /// A fresh record of which pages were requested (the loop guard), with page 1's.
    pub fn visited(&self, first: &HttpAction) -> Visited {
        let mut visited = Visited::default();
        visited.0.insert(match &self.next {
            Next::Cursor { param, .. } => first
                .url
                .query_pairs()
                .find(|(n, _)| n == param.as_str())
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default(),
            Next::LinkHeader | Next::UrlPath(_) => first.url.as_str().to_owned(),
        });
        visited
    }

    /// What the page (`url`, `headers`, its JSON body if any) says comes next.
    pub fn next_page(&self, url: &url::Url, headers: &[(String, String)], json: Option<&Value>) -> NextPage {
        match &self.next {
            Next::LinkHeader => {
                let link = headers
                    .iter()
                    .filter(|(name, _)| name.eq_ignore_ascii_case("link"))
                    .find_map(|(_, value)| link_next(value));
                match link {
                    Some(target) => resolve(url, target),
                    None => NextPage::None,
                }
            }
            Next::UrlPath(path) => match json.and_then(|json| one_node(path, json)) {
                Some(Value::String(s)) if !s.is_empty() => resolve(url, s),
                None | Some(Value::Null) | Some(Value::String(_)) => NextPage::None,
                Some(other) => {
                    NextPage::Invalid(format!("the next URL is a JSON {}, not a string", type_of(other)))
                }
            },
            Next::Cursor { path, .. } => match json.and_then(|json| one_node(path, json)) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => NextPage::None,
                Some(Value::String(s)) if s.is_empty() => NextPage::None,
                Some(Value::String(s)) if s.len() > MAX_NEXT_LEN => {
                    NextPage::Invalid(format!("the cursor is longer than {MAX_NEXT_LEN} bytes"))
                }
                Some(Value::String(s)) => NextPage::Cursor(s.clone()),
                Some(Value::Number(n)) => NextPage::Cursor(n.to_string()),
                Some(other) => NextPage::Invalid(format!(
                    "the cursor is a JSON {}, not a string or number",
                    type_of(other)
                )),
            },
        }
    }

    /// The page's items: the nodes `items_path` selects (one array selected: its elements);
    /// without a path, the body's elements when it is an array.
    pub fn items(&self, json: Option<&Value>) -> Vec<Value> {
        let Some(json) = json else { return Vec::new() };
        let nodes = match &self.items_path {
            None => return if let Value::Array(items) = json { items.clone() } else { Vec::new() },
            Some(path) => path.query(json).all(),
        };
        match nodes.as_slice() {
            [Value::Array(items)] if self.items_singular => items.clone(),
            _ => nodes.into_iter().cloned().collect(),
        }
    }
}

/// The next URLs or cursors an action requested: a page naming one again is a loop.
#[derive(Debug, Default)]
pub struct Visited(HashSet<String>);

impl Visited {
    /// Records `next`; false when it was requested already.
    pub fn first_time(&mut self, next: &NextPage) -> bool {
        match next {
            NextPage::Url(url) => self.0.insert(url.as_str().to_owned()),
            NextPage::Cursor(cursor) => self.0.insert(cursor.clone()),
            NextPage::None | NextPage::Invalid(_) => true,
        }
    }
}

impl HttpAction {
    /// Pagination, when the action walks a collection.
    pub fn paginate(&self) -> Option<&Paginate> {
        self.uncommon().paginate.as_ref()
    }

    /// The action that requests `next` after the page `self` (a `NextPage::Url` or `Cursor`;
    /// `first` is the action as the caller wrote it, whose request a cursor repeats). A next
    /// URL is a GET without a body; one on another origin than the page's goes without the
    /// credentials, as a redirect does.
    pub fn next_page(&self, first: &HttpAction, next: &NextPage) -> HttpAction {
        match next {
            NextPage::Cursor(cursor) => {
                let mut page = first.clone();
                if let Some(Next::Cursor { param, .. }) = first.paginate().map(|p| &p.next) {
                    let kept: Vec<(String, String)> = first
                        .url
                        .query_pairs()
                        .filter(|(name, _)| name != param.as_str())
                        .map(|(n, v)| (n.into_owned(), v.into_owned()))
                        .collect();
                    page.url.query_pairs_mut().clear().extend_pairs(kept).append_pair(param, cursor);
                }
                page
            }
            // A GET of the next URL, credentials dropped across origins (as a poll's).
            NextPage::Url(url) => self.follow_up(url.clone()),
            NextPage::None | NextPage::Invalid(_) => self.clone(),
        }
    }
}

/// The size of `value` as an item of the reply: a length-delimited google.protobuf.Value (the
/// Execute reply's size is what gRPC clients bound, 4 MiB by default, and a Value costs more
/// than its JSON: 9 bytes a number).
pub fn reply_size(value: &Value) -> u64 {
    fn delimited(len: u64) -> u64 {
        1 + varint_len(len) + len
    }
    fn varint_len(n: u64) -> u64 {
        u64::from((64 - (n | 1).leading_zeros()).div_ceil(7))
    }
    fn size(v: &Value) -> u64 {
        match v {
            Value::Null | Value::Bool(_) => 2,
            Value::Number(_) => 9,
            Value::String(s) => delimited(s.len() as u64),
            Value::Array(items) => delimited(items.iter().map(|i| delimited(size(i))).sum()),
            Value::Object(fields) => delimited(
                fields.iter().map(|(k, v)| delimited(delimited(k.len() as u64) + delimited(size(v)))).sum(),
            ),
        }
    }
    delimited(size(value))
}

/// The page's URL as a reply may show it: scheme, host, port and path (no query, no
/// credentials: either may carry a secret).
pub fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.into()
}

/// Validates `input` (`None`: no pagination), each problem named `paginate.…`.
pub(super) fn parse(input: Option<PaginateInput>, bad: &mut InvalidAction) -> Option<Paginate> {
    let input = input?;
    let before = bad.violations.len();
    let next = match input.next {
        NextInput::LinkHeader => Some(Next::LinkHeader),
        NextInput::LinkHeaderFalse => {
            bad.push("paginate.link_header", "must be true when set (or set next_url_path or cursor)");
            None
        }
        NextInput::UrlPath(path) => path_of("paginate.next_url_path", &path, false, bad).map(Next::UrlPath),
        NextInput::Cursor { path, param } => {
            let path = path_of("paginate.cursor.path", &path, false, bad);
            if param.is_empty() {
                bad.push("paginate.cursor.param", "is required: the query parameter the cursor goes in");
            } else if param.len() > MAX_CURSOR_PARAM_LEN {
                bad.push("paginate.cursor.param", format!("is longer than {MAX_CURSOR_PARAM_LEN} bytes"));
            }
            path.filter(|_| !param.is_empty() && param.len() <= MAX_CURSOR_PARAM_LEN)
                .map(|path| Next::Cursor { path, param })
        }
    };
    let items_path = path_of("paginate.items_path", &input.items_path, true, bad);
    let items_singular = singular(&input.items_path);
    let max_pages = input.max_pages.unwrap_or(DEFAULT_MAX_PAGES);
    if !(1..=MAX_MAX_PAGES).contains(&max_pages) {
        bad.push(
            "paginate.max_pages",
            format!("is {max_pages}; it must be 1 to {MAX_MAX_PAGES} (unset: {DEFAULT_MAX_PAGES})"),
        );
    }
    match next {
        Some(next) if bad.violations.len() == before => {
            Some(Paginate { next, items_path, items_singular, max_pages })
        }
        _ => None,
    }
}

/// A JSONPath field; empty is `None` (an error unless `optional`).
fn path_of(field: &str, path: &str, optional: bool, bad: &mut InvalidAction) -> Option<JsonPath> {
    if path.is_empty() {
        if !optional {
            bad.push(field, "is required: an RFC 9535 JSONPath such as \"$.next\"");
        }
        return None;
    }
    if path.len() > MAX_EXTRACT_PATH_LEN {
        bad.push(field, format!("is longer than {MAX_EXTRACT_PATH_LEN} bytes"));
        return None;
    }
    if nesting(path) > MAX_PATH_NESTING {
        bad.push(field, format!("nests brackets deeper than {MAX_PATH_NESTING} levels"));
        return None;
    }
    match JsonPath::parse(path) {
        Ok(path) => Some(path),
        Err(e) => {
            bad.push(field, format!("\"{}\" is not an RFC 9535 JSONPath: {e}", excerpt(path, 64)));
            None
        }
    }
}

/// Whether a (valid) path names at most one node: only names and indexes, no wildcard,
/// descendant, filter, slice or union (RFC 9535 2.3.5.1's singular query), quoted names skipped.
fn singular(path: &str) -> bool {
    let mut previous = ' ';
    for c in unquoted(path) {
        match c {
            '*' | '?' | ':' | ',' => return false,
            '.' if previous == '.' => return false,
            _ => {}
        }
        previous = c;
    }
    true
}

/// The one node `path` selects (the first when several are).
fn one_node<'a>(path: &JsonPath, json: &'a Value) -> Option<&'a Value> {
    path.query(json).all().into_iter().next()
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `target` resolved against the page's URL: http(s) only, credentials and fragment dropped.
fn resolve(page: &url::Url, target: &str) -> NextPage {
    if target.len() > MAX_NEXT_LEN {
        return NextPage::Invalid(format!("the next URL is longer than {MAX_NEXT_LEN} bytes"));
    }
    let mut url = match page.join(target.trim()) {
        Ok(url) => url,
        Err(e) => {
            return NextPage::Invalid(format!("the next URL \"{}\" does not parse: {e}", excerpt(target, 64)))
        }
    };
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return NextPage::Invalid(format!("the next URL's scheme {:?} is not http or https", url.scheme()));
    }
    url.set_fragment(None);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    NextPage::Url(url)
}

/// The target of a `Link` header value's link with rel "next" (RFC 8288: `<uri>; rel="next"`,
/// links separated by commas, rel a space-separated list, compared case-insensitively).
fn link_next(value: &str) -> Option<&str> {
    let mut rest = value;
    loop {
        let open = rest.find('<')?;
        let close = open + rest[open..].find('>')?;
        let target = &rest[open + 1..close];
        rest = &rest[close + 1..];
        // The parameters run to the next link: a comma outside a quoted string.
        let mut end = rest.len();
        let mut quoted = false;
        for (i, c) in rest.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let params = &rest[..end];
        rest = &rest[end..];
        let next = params.split(';').filter_map(|p| p.split_once('=')).any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("rel")
                && value
                    .trim()
                    .trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|r| r.eq_ignore_ascii_case("next"))
        });
        if next {
            return Some(target);
        }
    }
}

impl PaginationEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LastPage => "LAST_PAGE",
            Self::MaxPages => "MAX_PAGES",
            Self::Loop => "LOOP",
            Self::ItemsCapped => "ITEMS_CAPPED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::ActionInput;
    use http::{header, Method};
    use serde_json::json;

    fn paginate(input: PaginateInput) -> Result<Paginate, InvalidAction> {
        let mut bad = InvalidAction::default();
        let p = parse(Some(input), &mut bad);
        p.filter(|_| bad.is_empty()).ok_or(bad)
    }

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn link_headers_name_their_next_link() {
        assert_eq!(link_next(r#"<https://a.test/2>; rel="next""#), Some("https://a.test/2"));
        assert_eq!(
            link_next(r#"<https://a.test/1>; rel="prev first", </p?page=3&x=a,b>; title="a, b"; REL=next"#),
            Some("/p?page=3&x=a,b")
        );
        assert_eq!(link_next(r#"<https://a.test/9>; rel="last""#), None);
        assert_eq!(link_next("garbage"), None);
        assert_eq!(link_next("<unclosed; rel=next"), None);
        let p = paginate(PaginateInput::default()).unwrap();
        let headers = vec![("Link".to_owned(), r#"</items?page=2>; rel="next""#.to_owned())];
        assert_eq!(
            p.next_page(&url("http://h.test/items?page=1"), &headers, None),
            NextPage::Url(url("http://h.test/items?page=2"))
        );
        assert_eq!(p.next_page(&url("http://h.test/items"), &[], None), NextPage::None);
    }

    #[test]
    fn next_urls_resolve_against_the_page_and_must_be_http() {
        let p = paginate(PaginateInput { next: NextInput::UrlPath("$.next".into()), ..Default::default() })
            .unwrap();
        let page = url("https://h.test/v1/items?page=1");
        let next = |body: Value| p.next_page(&page, &[], Some(&body));
        assert_eq!(
            next(json!({"next": "items?page=2"})),
            NextPage::Url(url("https://h.test/v1/items?page=2"))
        );
        assert_eq!(next(json!({"next": "http://u:p@o.test/x#f"})), NextPage::Url(url("http://o.test/x")));
        assert_eq!(next(json!({"next": null})), NextPage::None);
        assert_eq!(next(json!({"next": ""})), NextPage::None);
        assert_eq!(next(json!({})), NextPage::None);
        assert!(matches!(next(json!({"next": "file:///etc/passwd"})), NextPage::Invalid(_)));
        assert!(matches!(next(json!({"next": 7})), NextPage::Invalid(_)));
    }

    #[test]
    fn cursors_are_strings_or_numbers_and_end_on_null_empty_or_false() {
        let p = paginate(PaginateInput {
            next: NextInput::Cursor { path: "$.meta.cursor".into(), param: "cursor".into() },
            ..Default::default()
        })
        .unwrap();
        let page = url("http://h.test/");
        let next = |body: Value| p.next_page(&page, &[], Some(&body));
        assert_eq!(next(json!({"meta": {"cursor": "abc"}})), NextPage::Cursor("abc".into()));
        assert_eq!(next(json!({"meta": {"cursor": 40}})), NextPage::Cursor("40".into()));
        for end in [
            json!({"meta": {"cursor": null}}),
            json!({"meta": {"cursor": ""}}),
            json!({"meta": {"cursor": false}}),
            json!({}),
        ] {
            assert_eq!(next(end), NextPage::None);
        }
        assert!(matches!(next(json!({"meta": {"cursor": [1]}})), NextPage::Invalid(_)));
    }

    #[test]
    fn items_are_the_selected_nodes_or_one_selected_array() {
        let with =
            |path: &str| paginate(PaginateInput { items_path: path.into(), ..Default::default() }).unwrap();
        let body = json!({"data": [{"id": 1}, {"id": 2}]});
        assert_eq!(with("$.data[*]").items(Some(&body)), vec![json!({"id": 1}), json!({"id": 2})]);
        assert_eq!(with("$.data").items(Some(&body)), vec![json!({"id": 1}), json!({"id": 2})]);
        assert_eq!(with("$.data[*].id").items(Some(&body)), vec![json!(1), json!(2)]);
        assert_eq!(with("$['data']").items(Some(&body)), vec![json!({"id": 1}), json!({"id": 2})]);
        let nested = json!({"data": [[1, 2]]});
        assert_eq!(
            with("$.data[*]").items(Some(&nested)),
            vec![json!([1, 2])],
            "a wildcard's one node is one item"
        );
        assert_eq!(with("$..data").items(Some(&nested)), vec![json!([[1, 2]])]);
        assert_eq!(with("$.data[0]").items(Some(&nested)), vec![json!(1), json!(2)]);
        assert_eq!(
            with("$['a*b']").items(Some(&json!({"a*b": [3]}))),
            vec![json!(3)],
            "quoted names skipped"
        );
        assert_eq!(with("$.none").items(Some(&body)), Vec::<Value>::new());
        assert_eq!(with("").items(Some(&json!([1, 2]))), vec![json!(1), json!(2)]);
        assert_eq!(with("").items(Some(&body)), Vec::<Value>::new());
        assert_eq!(with("$.data").items(None), Vec::<Value>::new());
    }

    #[test]
    fn bad_settings_name_their_field() {
        let fields = |input: PaginateInput| -> Vec<String> {
            paginate(input).err().unwrap().violations.into_iter().map(|v| v.field).collect()
        };
        assert_eq!(
            fields(PaginateInput { max_pages: Some(0), ..Default::default() }),
            ["paginate.max_pages"]
        );
        assert_eq!(
            fields(PaginateInput { max_pages: Some(1001), ..Default::default() }),
            ["paginate.max_pages"]
        );
        assert!(paginate(PaginateInput { max_pages: Some(1000), ..Default::default() }).is_ok());
        assert_eq!(
            fields(PaginateInput { items_path: "data[".into(), ..Default::default() }),
            ["paginate.items_path"]
        );
        assert_eq!(
            fields(PaginateInput { items_path: "$".repeat(2000), ..Default::default() }),
            ["paginate.items_path"]
        );
        assert_eq!(
            fields(PaginateInput { next: NextInput::UrlPath(String::new()), ..Default::default() }),
            ["paginate.next_url_path"]
        );
        assert_eq!(
            fields(PaginateInput {
                next: NextInput::Cursor { path: "$.c".into(), param: String::new() },
                ..Default::default()
            }),
            ["paginate.cursor.param"]
        );
        assert_eq!(
            fields(PaginateInput { next: NextInput::LinkHeaderFalse, ..Default::default() }),
            ["paginate.link_header"]
        );
    }

    fn action(input: ActionInput) -> HttpAction {
        HttpAction::from_input(input).unwrap()
    }

    #[test]
    fn a_cursor_repeats_the_request_with_its_parameter_replaced() {
        let first = action(ActionInput {
            method: "POST".into(),
            url: "http://h.test/search?q=a+b&cursor=old".into(),
            body: crate::action::BodyInput::Json("{}".into()),
            paginate: Some(PaginateInput {
                next: NextInput::Cursor { path: "$.c".into(), param: "cursor".into() },
                ..Default::default()
            }),
            ..Default::default()
        });
        let page = first.next_page(&first, &NextPage::Cursor("x&y".into()));
        assert_eq!(page.url().as_str(), "http://h.test/search?q=a+b&cursor=x%26y");
        assert_eq!(page.method(), Method::POST);
        assert_eq!(page.body().as_ref(), b"{}");
    }

    #[test]
    fn a_next_url_on_another_origin_goes_without_credentials() {
        let first = action(ActionInput {
            method: "POST".into(),
            url: "http://h.test/items".into(),
            headers: vec![("authorization".into(), "Bearer t".into()), ("x-trace".into(), "1".into())],
            body: crate::action::BodyInput::Json("{}".into()),
            paginate: Some(PaginateInput::default()),
            ..Default::default()
        });
        let same = first.next_page(&first, &NextPage::Url(url("http://h.test/items?page=2")));
        assert_eq!(same.method(), Method::GET);
        assert!(same.body().is_empty() && !same.headers().contains_key(header::CONTENT_TYPE));
        assert!(same.headers().contains_key(header::AUTHORIZATION), "same origin keeps credentials");
        let other = same.next_page(&first, &NextPage::Url(url("http://o.test/items?page=3")));
        assert!(!other.headers().contains_key(header::AUTHORIZATION));
        assert!(other.headers().contains_key("x-trace"));
        let back = other.next_page(&first, &NextPage::Url(url("http://h.test/items?page=4")));
        assert!(!back.headers().contains_key(header::AUTHORIZATION), "not given back once dropped");
    }

    #[test]
    fn visited_pages_are_loops() {
        let first = action(ActionInput {
            method: "GET".into(),
            url: "http://h.test/items".into(),
            paginate: Some(PaginateInput::default()),
            ..Default::default()
        });
        let mut visited = first.paginate().unwrap().visited(&first);
        assert!(!visited.first_time(&NextPage::Url(url("http://h.test/items"))), "page 1 itself");
        assert!(visited.first_time(&NextPage::Url(url("http://h.test/items?page=2"))));
        assert!(!visited.first_time(&NextPage::Url(url("http://h.test/items?page=2"))));
        assert_eq!(shown_url(&url("http://u:p@h.test/items?key=secret#x")), "http://h.test/items");
    }
}
