//! A small evaluator of IAM identity policies for the test S3 server: what AWS would allow of
//! the Allow statements tidemark prints (`Action`, `Resource` with `*` wildcards, and the
//! `StringLike` / `StringLikeIfExists` conditions on `s3:prefix`). Deny statements, other
//! condition keys and principals are not used by those policies: a policy holding them is
//! refused when set, so a test never runs under a policy it does not understand.

/// One request as IAM sees it.
#[derive(Clone, Debug)]
pub struct Request {
    /// `s3:GetObject`, …
    pub action: &'static str,
    /// `arn:aws:s3:::bucket` or `arn:aws:s3:::bucket/key`.
    pub resource: String,
    /// The `s3:prefix` condition key (ListObjectsV2 and ListMultipartUploads with a prefix).
    pub prefix: Option<String>,
}

/// The statements of a policy.
#[derive(Clone, Debug)]
pub struct IamPolicy {
    statements: Vec<Statement>,
}

#[derive(Clone, Debug)]
struct Statement {
    actions: Vec<String>,
    resources: Vec<String>,
    /// (patterns, if-exists) of `s3:prefix`.
    prefix: Option<(Vec<String>, bool)>,
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("a string").to_string())
            .collect(),
        other => panic!("not a string or a list: {other}"),
    }
}

impl IamPolicy {
    /// Parses a policy document; panics on anything this evaluator does not model.
    pub fn parse(doc: &serde_json::Value) -> IamPolicy {
        let statements = doc["Statement"]
            .as_array()
            .expect("a Statement list")
            .iter()
            .map(|s| {
                assert_eq!(s["Effect"], "Allow", "only Allow statements: {s}");
                let obj = s.as_object().unwrap();
                for k in obj.keys() {
                    assert!(
                        ["Sid", "Effect", "Action", "Resource", "Condition"].contains(&k.as_str()),
                        "unmodelled field {k} in {s}"
                    );
                }
                let prefix = s.get("Condition").map(|c| {
                    let c = c.as_object().unwrap();
                    assert_eq!(c.len(), 1, "one condition operator: {s}");
                    let (op, keys) = c.iter().next().unwrap();
                    let if_exists = match op.as_str() {
                        "StringLike" => false,
                        "StringLikeIfExists" => true,
                        other => panic!("unmodelled condition {other}"),
                    };
                    let keys = keys.as_object().unwrap();
                    assert_eq!(keys.len(), 1, "one condition key: {s}");
                    (strings(&keys["s3:prefix"]), if_exists)
                });
                Statement {
                    actions: strings(&s["Action"]),
                    resources: strings(&s["Resource"]),
                    prefix,
                }
            })
            .collect();
        IamPolicy { statements }
    }

    /// Whether some statement allows the request.
    pub fn allows(&self, r: &Request) -> bool {
        self.statements.iter().any(|s| {
            s.actions.iter().any(|a| glob(a, r.action))
                && s.resources.iter().any(|p| glob(p, &r.resource))
                && match (&s.prefix, &r.prefix) {
                    (None, _) => true,
                    (Some((_, true)), None) => true,
                    (Some((_, false)), None) => false,
                    (Some((patterns, _)), Some(p)) => patterns.iter().any(|pat| glob(pat, p)),
                }
        })
    }
}

/// IAM's wildcard match: `*` any run of characters, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[test]
fn the_evaluator_matches_wildcards_and_prefix_conditions() {
    assert!(glob("arn:aws:s3:::b/p/*", "arn:aws:s3:::b/p/x/y"));
    assert!(!glob("arn:aws:s3:::b/p/*", "arn:aws:s3:::b/q/x"));
    assert!(glob("p/*", "p/"));
    assert!(!glob("p/*", "p"));
    let policy = IamPolicy::parse(&serde_json::json!({"Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::b",
         "Condition": {"StringLikeIfExists": {"s3:prefix": ["p/*"]}}},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/p/*"}]}));
    let req = |action, resource: &str, prefix: Option<&str>| Request {
        action,
        resource: resource.into(),
        prefix: prefix.map(str::to_string),
    };
    assert!(policy.allows(&req("s3:ListBucket", "arn:aws:s3:::b", Some("p/segments/"))));
    assert!(policy.allows(&req("s3:ListBucket", "arn:aws:s3:::b", None)));
    assert!(!policy.allows(&req("s3:ListBucket", "arn:aws:s3:::b", Some("other/"))));
    assert!(policy.allows(&req("s3:GetObject", "arn:aws:s3:::b/p/a", None)));
    assert!(!policy.allows(&req("s3:GetObject", "arn:aws:s3:::b/other/a", None)));
    assert!(!policy.allows(&req("s3:PutObject", "arn:aws:s3:::b/p/a", None)));
}
