//! One way to declare a setting: its variable name, help, kind, default and
//! range are written once, in a [`Setting`] constant, and everything else
//! comes from it: the command-line flag and `--help` text (the `nexus`
//! binary builds them from the declarations), the environment lookup, the
//! default, and the validation message that names the variable.
//!
//! Raw values travel as [`Values`] (strings by variable name, as they came
//! from a flag, the environment or the state folder); each part's config
//! type turns them into checked values at start-up.
//!
//! ```
//! use nexus_core::settings::{Setting, Values};
//! const TIMEOUT: Setting = Setting::number("TIMEOUT_SECS", "Timeout of each call", "10", 1, 300, "seconds");
//! let v = Values::new().with(&TIMEOUT, "500");
//! assert_eq!(
//!     v.number(&TIMEOUT).unwrap_err().to_string(),
//!     "TIMEOUT_SECS: must be a whole number of seconds from 1 to 300"
//! );
//! assert_eq!(Values::new().number(&TIMEOUT).unwrap(), 10);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A configuration value is missing or wrong; `Display` is one line naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    /// The environment variable (or flag) at fault.
    pub var: &'static str,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl ConfigError {
    /// An error about `var`.
    pub fn new(var: &'static str, reason: impl Into<String>) -> Self {
        Self {
            var,
            reason: reason.into(),
        }
    }
}

/// What a setting takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text, checked by the part that reads it (URLs, addresses, lists).
    Text,
    /// A key or password: read from the environment or the state folder,
    /// never from a flag (other users can read the process list), and never
    /// shown by `Debug`.
    Secret,
    /// A whole number from `min` to `max` (`u64::MAX`: no upper bound), in `unit`.
    Number {
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
        /// `seconds`, `bytes`, ... (empty: a plain count).
        unit: &'static str,
    },
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Bool,
}

/// One setting, declared once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The environment variable (the flag is its lower-case, dashed form).
    pub name: &'static str,
    /// One line for `--help`.
    pub help: &'static str,
    /// What it takes.
    pub kind: Kind,
    /// The value used when it is unset.
    pub default: Option<&'static str>,
    /// The flag, when it is not the variable's lower-case, dashed form.
    pub flag_name: Option<&'static str>,
}

impl Setting {
    /// A text setting without a default.
    pub const fn text(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: Kind::Text,
            default: None,
            flag_name: None,
        }
    }

    /// A secret setting (environment or state folder only).
    pub const fn secret(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: Kind::Secret,
            default: None,
            flag_name: None,
        }
    }

    /// A whole number from `min` to `max` in `unit`, `default` when unset.
    pub const fn number(
        name: &'static str,
        help: &'static str,
        default: &'static str,
        min: u64,
        max: u64,
        unit: &'static str,
    ) -> Self {
        Self {
            name,
            help,
            kind: Kind::Number { min, max, unit },
            default: Some(default),
            flag_name: None,
        }
    }

    /// A true/false setting, `default` when unset.
    pub const fn boolean(name: &'static str, help: &'static str, default: bool) -> Self {
        Self {
            name,
            help,
            kind: Kind::Bool,
            default: Some(if default { "true" } else { "false" }),
            flag_name: None,
        }
    }

    /// The same setting with a default.
    pub const fn or(mut self, default: &'static str) -> Self {
        self.default = Some(default);
        self
    }

    /// The same setting with a flag of another name (kept for flags that
    /// existed before the declaration).
    pub const fn flag_as(mut self, flag: &'static str) -> Self {
        self.flag_name = Some(flag);
        self
    }

    /// The command-line flag: `REFRESH_MARGIN_SECS` → `refresh-margin-secs`.
    pub fn flag(&self) -> String {
        match self.flag_name {
            Some(f) => f.to_string(),
            None => self.name.to_ascii_lowercase().replace('_', "-"),
        }
    }

    /// Whether the value must stay out of flags and output.
    pub fn is_secret(&self) -> bool {
        self.kind == Kind::Secret
    }

    /// What a valid value looks like, in the words of an error message.
    pub fn expectation(&self) -> String {
        match self.kind {
            Kind::Number { min, max, unit } => {
                let of = if unit.is_empty() {
                    String::new()
                } else {
                    format!(" of {unit}")
                };
                let off = if min == 0 && unit.is_empty() {
                    " (off)"
                } else {
                    ""
                };
                if max == u64::MAX {
                    format!("must be a whole number{of}, at least {min}")
                } else {
                    format!("must be a whole number{of} from {min}{off} to {max}")
                }
            }
            Kind::Bool => "must be true or false".into(),
            Kind::Text | Kind::Secret => "must be set".into(),
        }
    }
}

/// Raw setting values by variable name. `Debug` shows secrets only as
/// `[set]` and URLs without their passwords.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Values(BTreeMap<&'static str, (String, bool)>);

impl Values {
    /// No values.
    pub fn new() -> Self {
        Self::default()
    }

    /// These values and `s` set to `value`.
    pub fn with(mut self, s: &Setting, value: impl Into<String>) -> Self {
        self.0.insert(s.name, (value.into(), s.is_secret()));
        self
    }

    /// Sets `s` (`None` unsets it).
    pub fn set(&mut self, s: &Setting, value: Option<String>) {
        match value {
            Some(v) => self.0.insert(s.name, (v, s.is_secret())),
            None => self.0.remove(s.name),
        };
    }

    /// Sets `s` only when it is unset (or blank).
    pub fn fill(&mut self, s: &Setting, value: Option<String>) {
        if self.given(s).is_none() {
            self.set(s, value);
        }
    }

    /// The value as given, trimmed; `None` when unset or blank.
    pub fn given(&self, s: &Setting) -> Option<&str> {
        self.0
            .get(s.name)
            .map(|(v, _)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Two settings that go together (a certificate and its key): both
    /// values, or `None` for neither; one without the other names the
    /// missing one.
    pub fn pair(&self, a: &Setting, b: &Setting) -> Result<Option<(&str, &str)>, ConfigError> {
        match (self.given(a), self.given(b)) {
            (None, None) => Ok(None),
            (Some(x), Some(y)) => Ok(Some((x, y))),
            (Some(_), None) => Err(ConfigError::new(
                b.name,
                format!("is required with {}", a.name),
            )),
            (None, Some(_)) => Err(ConfigError::new(
                a.name,
                format!("is required with {}", b.name),
            )),
        }
    }

    /// The value as given, else the default.
    pub fn text(&self, s: &Setting) -> Option<&str> {
        self.given(s).or(s.default)
    }

    /// The value, required: an error naming the variable when unset.
    pub fn required(&self, s: &Setting, hint: &str) -> Result<&str, ConfigError> {
        self.text(s)
            .ok_or_else(|| ConfigError::new(s.name, format!("is not set; {hint}")))
    }

    /// A [`Kind::Number`] setting, checked against its range.
    pub fn number(&self, s: &Setting) -> Result<u64, ConfigError> {
        let Kind::Number { min, max, .. } = s.kind else {
            return Err(ConfigError::new(s.name, "is not a number setting"));
        };
        self.text(s)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| ConfigError::new(s.name, s.expectation()))
    }

    /// A number setting in `usize`.
    pub fn count(&self, s: &Setting) -> Result<usize, ConfigError> {
        let n = self.number(s)?;
        usize::try_from(n).map_err(|_| ConfigError::new(s.name, s.expectation()))
    }

    /// A number setting of seconds.
    pub fn secs(&self, s: &Setting) -> Result<Duration, ConfigError> {
        self.number(s).map(Duration::from_secs)
    }

    /// A [`Kind::Bool`] setting.
    pub fn boolean(&self, s: &Setting) -> Result<bool, ConfigError> {
        match self.text(s).map(str::to_ascii_lowercase).as_deref() {
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") | None => Ok(false),
            Some(_) => Err(ConfigError::new(s.name, s.expectation())),
        }
    }

    /// The names set, in order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.keys().copied()
    }
}

impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets show only that they are set; any URL loses its password.
        let mut m = f.debug_map();
        for (k, (v, secret)) in &self.0 {
            if *secret {
                m.entry(k, &"[set]");
            } else {
                m.entry(k, &redact_url(v));
            }
        }
        m.finish()
    }
}

/// Hides the password of a URL for logs, in the userinfo part or as a
/// `password=` query parameter. Text that is not a URL comes back as it is.
///
/// ```
/// assert_eq!(nexus_core::settings::redact_url("postgres://u:pw@h/db"), "postgres://u:REDACTED@h/db");
/// ```
pub fn redact_url(raw: &str) -> String {
    let Ok(mut u) = url::Url::parse(raw) else {
        return raw.to_string();
    };
    if u.password().is_some() {
        // Setting a password only fails for URLs that cannot have one, which this has.
        let _ = u.set_password(Some("REDACTED"));
    }
    if u.query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "REDACTED".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// Checks that every default in `list` passes its own validation and that
/// no name is declared twice (a unit test of each part calls this).
pub fn check_declarations(list: &[&Setting]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    let empty = Values::new();
    for s in list {
        if !seen.insert(s.name) {
            return Err(format!("{} declared twice", s.name));
        }
        match s.kind {
            Kind::Number { .. } => {
                empty.number(s).map_err(|e| e.to_string())?;
            }
            Kind::Bool => {
                empty.boolean(s).map_err(|e| e.to_string())?;
            }
            Kind::Secret if s.default.is_some() => {
                return Err(format!("{} is a secret with a default", s.name));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Declares a part's settings once: a constant [`Setting`] per variable
/// and a struct of raw values (`Option<String>` per field, so tests write
/// `Settings { api_key: Some(..), ..Default::default() }`) with
/// `ALL` (every declaration, for the command line), `get`/`set` by variable
/// name, `values()` (for validation) and a `Debug` that hides secrets.
///
/// ```
/// nexus_core::declare_settings! {
///     /// Raw settings of an example part.
///     pub struct ExampleSettings {
///         /// Listen address.
///         addr: EXAMPLE_ADDR = nexus_core::settings::Setting::text("EXAMPLE_ADDR", "Listen address").or("127.0.0.1:0"),
///         /// The key.
///         key: EXAMPLE_KEY = nexus_core::settings::Setting::secret("EXAMPLE_KEY", "The key"),
///     }
/// }
/// let s = ExampleSettings { key: Some("hunter2".into()), ..Default::default() };
/// assert_eq!(s.values().text(&EXAMPLE_ADDR), Some("127.0.0.1:0"));
/// assert!(!format!("{s:?}").contains("hunter2"));
/// assert_eq!(ExampleSettings::ALL.len(), 2);
/// ```
#[macro_export]
macro_rules! declare_settings {
    (
        $(#[$smeta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $field:ident: $konst:ident = $decl:expr
            ),* $(,)?
        }
    ) => {
        $(
            $(#[$fmeta])*
            pub const $konst: $crate::settings::Setting = $decl;
        )*

        $(#[$smeta])*
        #[derive(Default, Clone, PartialEq, Eq)]
        $vis struct $name {
            $(
                $(#[$fmeta])*
                pub $field: Option<String>,
            )*
        }

        impl $name {
            /// Every setting of this part, in declaration order.
            pub const ALL: &'static [&'static $crate::settings::Setting] = &[$(&$konst),*];

            /// The raw value of the setting named `name`.
            pub fn get(&self, name: &str) -> Option<&str> {
                $( if name == $konst.name { return self.$field.as_deref(); } )*
                None
            }

            /// Sets the setting named `name`; false when no setting has that name.
            pub fn set(&mut self, name: &str, value: Option<String>) -> bool {
                $( if name == $konst.name { self.$field = value; return true; } )*
                false
            }

            /// The values, for validation.
            pub fn values(&self) -> $crate::settings::Values {
                let mut v = $crate::settings::Values::new();
                $( v.set(&$konst, self.$field.clone()); )*
                v
            }
        }

        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::Debug::fmt(&self.values(), f)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: Setting = Setting::number("CACHE", "entries", "10", 0, 100, "");
    const B: Setting = Setting::boolean("ON", "on or off", true);
    const K: Setting = Setting::secret("API_KEY", "the key");

    #[test]
    fn numbers_bools_and_messages() {
        assert_eq!(Values::new().number(&N).unwrap(), 10);
        assert_eq!(Values::new().with(&N, " 7 ").number(&N).unwrap(), 7);
        assert_eq!(
            Values::new()
                .with(&N, "x")
                .number(&N)
                .unwrap_err()
                .to_string(),
            "CACHE: must be a whole number from 0 (off) to 100"
        );
        assert!(Values::new().boolean(&B).unwrap());
        assert!(!Values::new().with(&B, "NO").boolean(&B).unwrap());
        assert_eq!(
            Values::new()
                .with(&B, "maybe")
                .boolean(&B)
                .unwrap_err()
                .to_string(),
            "ON: must be true or false"
        );
        let unbounded = Setting::number(
            "MAX_BODY_BYTES",
            "limit",
            "1048576",
            1024,
            u64::MAX,
            "bytes",
        );
        assert_eq!(
            unbounded.expectation(),
            "must be a whole number of bytes, at least 1024"
        );
        assert_eq!(N.flag(), "cache");
        assert_eq!(K.flag(), "api-key");
    }

    #[test]
    fn blank_is_unset_and_fill_keeps_given_values() {
        let mut v = Values::new().with(&N, "  ");
        assert_eq!(v.given(&N), None);
        v.fill(&N, Some("5".into()));
        v.fill(&N, Some("6".into()));
        assert_eq!(v.given(&N), Some("5"));
    }

    #[test]
    fn debug_hides_keys_and_url_passwords() {
        let db = Setting::text("DATABASE_URL", "db");
        let v = Values::new()
            .with(&K, "hunter2-hunter2")
            .with(&db, "postgres://u:pw@h/db");
        let shown = format!("{v:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn declarations_are_checked() {
        assert!(check_declarations(&[&N, &B, &K]).is_ok());
        assert!(check_declarations(&[&N, &N]).is_err());
        let bad = Setting::number("BAD", "x", "1000", 0, 10, "");
        assert!(check_declarations(&[&bad]).is_err());
    }
}
