//! Splitting a captured query string into its statements as PostgreSQL's simple-query protocol
//! runs them: a small lexer aware of quotes (`E'…'` escapes too), dollar quotes, parameters,
//! nested comments and `BEGIN ATOMIC … END` bodies. Its tokens are also what `replay`
//! classifies statements by.

/// What a token is: a word (keyword or identifier), a quoted identifier, a string constant, a
/// punctuation byte, or anything else (numbers, parameters, operators).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tok {
    Word,
    Quoted,
    Str,
    Punct(u8),
    Other,
}

/// A token and where it lies in the text (byte offsets).
#[derive(Clone, Copy, Debug)]
pub(super) struct Token {
    pub(super) kind: Tok,
    pub(super) start: usize,
    pub(super) end: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// Tokens of SQL text (standard_conforming_strings on). Unterminated quotes and comments end at
/// the end of the text.
pub(super) fn lex(sql: &str) -> Vec<Token> {
    let s = sql.as_bytes();
    let n = s.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let b = s[i];
        if b.is_ascii_whitespace() {
            i += 1;
        } else if b == b'-' && s.get(i + 1) == Some(&b'-') {
            while i < n && s[i] != b'\n' {
                i += 1;
            }
        } else if b == b'/' && s.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < n {
                if s[i] == b'/' && s.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == b'*' && s.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b == b'\'' {
            let start = i;
            i = skip_string(s, i, false);
            out.push(Token {
                kind: Tok::Str,
                start,
                end: i,
            });
        } else if b == b'"' {
            let start = i;
            i += 1;
            while i < n {
                if s[i] == b'"' {
                    if s.get(i + 1) == Some(&b'"') {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            out.push(Token {
                kind: Tok::Quoted,
                start,
                end: i,
            });
        } else if b == b'$' {
            let start = i;
            // $1 (a parameter) or $tag$…$tag$ (a dollar-quoted string).
            let mut j = i + 1;
            if j < n && s[j].is_ascii_digit() {
                while j < n && s[j].is_ascii_digit() {
                    j += 1;
                }
                out.push(Token {
                    kind: Tok::Other,
                    start,
                    end: j,
                });
                i = j;
                continue;
            }
            while j < n && is_ident_char(s[j]) && s[j] != b'$' {
                j += 1;
            }
            if j < n && s[j] == b'$' {
                let delim = &sql[i..=j];
                match sql[j + 1..].find(delim) {
                    Some(p) => i = j + 1 + p + delim.len(),
                    None => i = n,
                }
                out.push(Token {
                    kind: Tok::Str,
                    start,
                    end: i,
                });
            } else {
                out.push(Token {
                    kind: Tok::Other,
                    start,
                    end: i + 1,
                });
                i += 1;
            }
        } else if is_ident_start(b) {
            let start = i;
            while i < n && is_ident_char(s[i]) {
                i += 1;
            }
            // E'…' (backslash escapes), and B'…', X'…', N'…', U&'…' (plain).
            let word = &s[start..i];
            if i < n && s[i] == b'\'' && word.len() == 1 && b"eEbBxXnN".contains(&word[0]) {
                i = skip_string(s, i, word[0].eq_ignore_ascii_case(&b'e'));
                out.push(Token {
                    kind: Tok::Str,
                    start,
                    end: i,
                });
                continue;
            }
            out.push(Token {
                kind: Tok::Word,
                start,
                end: i,
            });
        } else if b.is_ascii_digit() {
            let start = i;
            while i < n && (s[i].is_ascii_alphanumeric() || s[i] == b'.' || s[i] == b'_') {
                i += 1;
            }
            out.push(Token {
                kind: Tok::Other,
                start,
                end: i,
            });
        } else {
            out.push(Token {
                kind: Tok::Punct(b),
                start: i,
                end: i + 1,
            });
            i += 1;
        }
    }
    out
}

/// Skips a quoted string starting at `i` (the opening quote); returns the index after it.
fn skip_string(s: &[u8], mut i: usize, backslash: bool) -> usize {
    i += 1;
    while i < s.len() {
        match s[i] {
            b'\\' if backslash => i += 2,
            b'\'' => {
                if s.get(i + 1) == Some(&b'\'') {
                    i += 2;
                } else {
                    return i + 1;
                }
            }
            _ => i += 1,
        }
    }
    s.len()
}

pub(super) fn upper(sql: &str, t: &Token) -> String {
    if t.kind == Tok::Word {
        sql[t.start..t.end].to_ascii_uppercase()
    } else {
        String::new()
    }
}

/// Splits a query string into its statements (without the `;`, comments before a statement
/// dropped), as PostgreSQL's simple-query protocol would run them.
pub fn split_statements(sql: &str) -> Vec<&str> {
    split_tokens(sql)
        .into_iter()
        .map(|toks| &sql[toks[0].start..toks[toks.len() - 1].end])
        .collect()
}

fn split_tokens(sql: &str) -> Vec<Vec<Token>> {
    let mut out = Vec::new();
    let mut cur: Vec<Token> = Vec::new();
    let mut parens = 0i32;
    let mut atomic = 0i32;
    for t in lex(sql) {
        if t.kind == Tok::Punct(b';') && parens <= 0 && atomic <= 0 {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            parens = 0;
            atomic = 0;
            continue;
        }
        match t.kind {
            Tok::Punct(b'(') => parens += 1,
            Tok::Punct(b')') => parens -= 1,
            Tok::Word if is_routine(sql, &cur) => match upper(sql, &t).as_str() {
                // SQL-standard bodies: CREATE FUNCTION … BEGIN ATOMIC …; …; END
                "BEGIN" => atomic += 1,
                "CASE" if atomic > 0 => atomic += 1,
                "END" if atomic > 0 => atomic -= 1,
                _ => {}
            },
            _ => {}
        }
        cur.push(t);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The statement so far is CREATE [OR REPLACE] FUNCTION/PROCEDURE.
fn is_routine(sql: &str, cur: &[Token]) -> bool {
    let words: Vec<String> = cur.iter().take(4).map(|t| upper(sql, t)).collect();
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        w.as_slice(),
        ["CREATE", "FUNCTION" | "PROCEDURE", ..]
            | ["CREATE", "OR", "REPLACE", "FUNCTION" | "PROCEDURE"]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_around_quotes_comments_and_bodies() {
        let sql = "CREATE TABLE t (a text DEFAULT 'x;y'); -- c;omment\n\
                   INSERT INTO t VALUES ($$a;b$$), (E'it\\'s;'), ($q$ $$ ; $q$);\
                   /* a /* nested; */ comment */ CREATE FUNCTION f() RETURNS int LANGUAGE sql \
                   BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END; \
                   ALTER TABLE \"we;ird\" ADD COLUMN b int;;  ";
        let parts = split_statements(sql);
        assert_eq!(parts.len(), 4, "{parts:#?}");
        assert_eq!(parts[0], "CREATE TABLE t (a text DEFAULT 'x;y')");
        assert!(parts[1].starts_with("INSERT") && parts[1].ends_with("$q$ $$ ; $q$)"));
        assert!(
            parts[2].starts_with("CREATE FUNCTION") && parts[2].ends_with("SELECT 2; END"),
            "{}",
            parts[2]
        );
        assert_eq!(parts[3], "ALTER TABLE \"we;ird\" ADD COLUMN b int");
        // A parameter is not a dollar quote.
        assert_eq!(split_statements("SELECT $1; SELECT 2").len(), 2);
    }
}
