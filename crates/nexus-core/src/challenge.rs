//! The `Bearer` challenge of a `WWW-Authenticate` value (RFC 9110 §11.6.1,
//! RFC 6750 §3): what a provider or an MCP server says when it refuses a
//! token. One parser for the broker (scope reports, MCP discovery) and the
//! sidecar (MCP step-up), so they read a challenge the same way.

/// The parameters of the `Bearer` challenge in `header` (which may hold
/// several challenges, `Basic realm="x", Bearer error="..."`), names in
/// lower case, quoted values unquoted and unescaped. `None` when there is no
/// `Bearer` challenge, or a quoted value is not closed.
///
/// ```
/// let p = nexus_core::challenge::bearer_params(
///     r#"Basic realm="x", Bearer error="insufficient_scope", scope="a b""#,
/// )
/// .unwrap();
/// assert_eq!(p, [("error".into(), "insufficient_scope".into()), ("scope".into(), "a b".into())]);
/// ```
pub fn bearer_params(header: &str) -> Option<Vec<(String, String)>> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut seen = false;
    let mut in_bearer = false;
    let mut rest = header.trim();
    while !rest.is_empty() {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let end = rest
            .find(|c: char| c == '=' || c == ',' || c.is_whitespace())
            .unwrap_or(rest.len());
        let token = &rest[..end];
        if token.is_empty() {
            break;
        }
        let after = rest[end..].trim_start_matches([' ', '\t']);
        if let Some(value_part) = after.strip_prefix('=') {
            // A parameter of the current challenge.
            let value_part = value_part.trim_start();
            let (value, remaining) = if let Some(q) = value_part.strip_prefix('"') {
                let mut v = String::new();
                let mut chars = q.char_indices();
                let mut close = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                v.push(n);
                            }
                        }
                        '"' => {
                            close = Some(i);
                            break;
                        }
                        c => v.push(c),
                    }
                }
                let close = close?;
                (v, &q[close + 1..])
            } else {
                let e = value_part.find(',').unwrap_or(value_part.len());
                (value_part[..e].trim().to_string(), &value_part[e..])
            };
            if in_bearer {
                params.push((token.to_ascii_lowercase(), value));
            }
            rest = remaining;
        } else {
            // A new challenge's scheme (token68 forms are not Bearer's).
            if in_bearer {
                break;
            }
            in_bearer = token.eq_ignore_ascii_case("bearer");
            seen |= in_bearer;
            rest = after;
        }
    }
    seen.then_some(params)
}

/// The value of `name` (lower case) among [`bearer_params`].
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_challenge_counts() {
        let p = bearer_params(r#"bearer error=insufficient_scope, scope="x""#).unwrap();
        assert_eq!(param(&p, "error"), Some("insufficient_scope"));
        assert_eq!(param(&p, "scope"), Some("x"));
        let p = bearer_params(r#"Bearer realm="a, \"b\"", ERROR="e", Basic realm="z""#).unwrap();
        assert_eq!(param(&p, "realm"), Some(r#"a, "b""#));
        assert_eq!(param(&p, "error"), Some("e"));
        assert_eq!(p.len(), 2, "Basic's realm is not Bearer's");
        assert_eq!(bearer_params("Bearer"), Some(vec![]));
        assert_eq!(bearer_params(r#"Basic realm="x""#), None);
        assert_eq!(bearer_params(r#"Bearer scope="unterminated"#), None);
        assert_eq!(bearer_params(""), None);
        assert_eq!(bearer_params(",,,==="), None);
    }
}
