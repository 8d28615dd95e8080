//! A connection's state, with its wire strings in one place (they are also
//! the values of the `status` column; the SQL in this folder spells them as
//! literals, which [`tests::sql_literals_are_the_wire_strings`] checks).

use std::fmt;

/// Where a connection stands (SPEC §5).
/// A new connection starts `pending` (hence the default).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    /// A handshake is under way.
    #[default]
    Pending,
    /// Serving tokens.
    Active,
    /// Serving tokens, but some scopes fail at the provider.
    Degraded,
    /// A person must re-consent (refresh refused, grant gone).
    AttentionRequired,
    /// Disconnected; every secret erased.
    Revoked,
    /// The first handshake failed.
    Failed,
}

impl ConnectionStatus {
    /// Every state.
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Active,
        Self::Degraded,
        Self::AttentionRequired,
        Self::Revoked,
        Self::Failed,
    ];

    /// The wire (and column) string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Degraded => "degraded",
            Self::AttentionRequired => "attention_required",
            Self::Revoked => "revoked",
            Self::Failed => "failed",
        }
    }

    /// The state a wire string names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the connection serves tokens (and takes scope reports).
    pub fn serves_tokens(self) -> bool {
        matches!(self, Self::Active | Self::Degraded)
    }

    /// Whether a person can fix it by consenting again.
    pub fn wants_reconsent(self) -> bool {
        matches!(self, Self::Degraded | Self::AttentionRequired)
    }
}

impl fmt::Display for ConnectionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with a wire string (tests and API checks read states as text).
impl PartialEq<&str> for ConnectionStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_round_trip() {
        for s in ConnectionStatus::ALL {
            assert_eq!(ConnectionStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(ConnectionStatus::parse("Active"), None);
    }

    #[test]
    fn sql_literals_are_the_wire_strings() {
        // Every quoted status literal in this folder's SQL is a known state.
        let sources = [
            include_str!("connections.rs"),
            include_str!("handshakes.rs"),
            include_str!("scope_reports.rs"),
            include_str!("leases.rs"),
        ];
        let mut seen = 0;
        for src in sources {
            for (i, _) in src.match_indices("status") {
                let rest = &src[i..src.len().min(i + 120)];
                for lit in rest.split('\'').skip(1).step_by(2).take(3) {
                    let looks_like_state = !lit.is_empty()
                        && lit.len() < 24
                        && lit.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                    if looks_like_state && rest.contains(&format!("'{lit}'")) {
                        seen += 1;
                        assert!(
                            ConnectionStatus::parse(lit).is_some(),
                            "SQL names an unknown status '{lit}'"
                        );
                    }
                }
            }
        }
        assert!(seen > 5, "the check found the SQL literals ({seen})");
    }
}
