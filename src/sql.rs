//! SQL text: the one way tidemark quotes identifiers and string literals.
//!
//! Every statement tidemark builds (replay, base backups, preflight, replication commands)
//! quotes through here, so there is one rule to review: an identifier is always double-quoted
//! with `"` doubled; a literal is single-quoted with `'` doubled, for a session with
//! `standard_conforming_strings = on` (the default since PostgreSQL 9.1; the replication
//! grammar reads literals the same way). Values that may hold bytes a literal cannot carry go
//! through [`crate::statement::quote_literal`], which checks them first.

/// `"name"`, every `"` doubled. Always quotes, so case and every character are kept.
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    push_ident(&mut out, ident);
    out
}

/// Appends `ident` quoted as by [`quote_ident`].
pub fn push_ident(out: &mut String, ident: &str) {
    out.reserve(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

/// `'text'`, every `'` doubled.
pub fn quote_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    push_literal(&mut out, text);
    out
}

/// Appends `text` quoted as by [`quote_literal`].
pub fn push_literal(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    let mut out = quote_ident(schema);
    out.push('.');
    push_ident(&mut out, name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_only_its_own_quote() {
        assert_eq!(quote_ident("my\"slot"), "\"my\"\"slot\"");
        assert_eq!(quote_ident("it's"), "\"it's\"");
        assert_eq!(quote_literal("\"a\",\"b'c\""), "'\"a\",\"b''c\"'");
        assert_eq!(quote_literal("back\\slash"), "'back\\slash'");
        assert_eq!(qualified("Sch\"ema", "t"), "\"Sch\"\"ema\".\"t\"");
        assert_eq!(quote_ident(""), "\"\"");
    }
}
