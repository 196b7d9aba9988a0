//! The one list of session settings that decide how values read as text: the walsender's
//! (pgoutput prints row values with them), the base backup's COPY sessions and the restore's
//! load and replay sessions all use it, so a value is printed and parsed the same way
//! everywhere, whatever the servers', databases' and roles' defaults.

/// Settings that change how values are printed or parsed, with the values tidemark fixes.
///
/// `search_path = pg_catalog` makes regclass, regtype, regproc… values print qualified; money
/// has one fixed format with `lc_monetary = C`.
pub const TEXT_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("search_path", "pg_catalog"),
    ("lc_monetary", "C"),
];

/// `SET name = 'value';` for each of `settings`, then each of [`TEXT_SETTINGS`].
pub fn set_statements(settings: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in settings.iter().chain(TEXT_SETTINGS) {
        out.push_str("SET ");
        out.push_str(name);
        out.push_str(" = ");
        crate::sql::push_literal(&mut out, value);
        out.push_str("; ");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_set_the_extra_settings_then_the_text_settings() {
        let sql = set_statements(&[("lock_timeout", "0")]);
        assert!(sql.starts_with("SET lock_timeout = '0'; SET DateStyle = 'ISO, YMD'; "));
        assert!(sql.ends_with("SET lc_monetary = 'C'; "));
        assert_eq!(sql.matches("SET ").count(), 1 + TEXT_SETTINGS.len());
    }
}
