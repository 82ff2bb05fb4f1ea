//! Which api-version a client speaks: the preview with `customId` (exactly-once creates) while
//! the service accepts it, then the newest GA version; or one version, pinned.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::ratelimit::Operation;
use crate::wire::{API_VERSION_WITH_CUSTOM_ID, API_VERSIONS, NEWEST_GA_API_VERSION, has_custom_id};

/// Whether `version` has `operation`: every one but the GET of an identity, which only the
/// versions with `customId` have.
pub(crate) fn serves(operation: Operation, version: &str) -> bool {
    operation != Operation::GetIdentity || has_custom_id(version)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ApiVersionPolicy {
    /// [`API_VERSION_WITH_CUSTOM_ID`] until the service refuses it (400
    /// `UnsupportedApiVersion`), then [`NEWEST_GA_API_VERSION`].
    #[default]
    PreviewThenGa,
    /// This version, whatever the service answers.
    Pinned(&'static str),
}

impl ApiVersionPolicy {
    /// A pin to `version`, if the service has ever served it.
    pub fn pinned(version: &str) -> Option<Self> {
        API_VERSIONS
            .iter()
            .find(|known| **known == version)
            .map(|known| Self::Pinned(known))
    }
}

/// A client's policy and whether it has fallen back.
#[derive(Debug)]
pub(crate) struct ApiVersionState {
    policy: ApiVersionPolicy,
    fell_back: AtomicBool,
}

impl ApiVersionState {
    pub(crate) fn new(policy: ApiVersionPolicy) -> Self {
        Self {
            policy,
            fell_back: AtomicBool::new(false),
        }
    }

    pub(crate) fn current(&self) -> &'static str {
        match self.policy {
            ApiVersionPolicy::Pinned(version) => version,
            ApiVersionPolicy::PreviewThenGa if self.fell_back.load(Ordering::Relaxed) => {
                NEWEST_GA_API_VERSION
            }
            ApiVersionPolicy::PreviewThenGa => API_VERSION_WITH_CUSTOM_ID,
        }
    }

    /// After the service refused `refused`: whether a request should go again with another
    /// version (the GA one, which this or a concurrent request switched to).
    pub(crate) fn fall_back_from(&self, refused: &str) -> bool {
        let may =
            self.policy == ApiVersionPolicy::PreviewThenGa && refused == API_VERSION_WITH_CUSTOM_ID;
        if may {
            self.fell_back.store(true, Ordering::Relaxed);
        }
        may
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preview_until_refused_then_the_newest_ga() {
        let state = ApiVersionState::new(ApiVersionPolicy::PreviewThenGa);
        assert_eq!(state.current(), "2025-03-02-preview");
        assert!(
            !state.fall_back_from("2026-09-23"),
            "GA refused: nothing to fall back to"
        );
        assert!(state.fall_back_from("2025-03-02-preview"));
        assert_eq!(state.current(), "2026-09-23");
        // A request still in flight with the preview goes again too.
        assert!(state.fall_back_from("2025-03-02-preview"));
    }

    #[test]
    fn a_pinned_version_never_moves() {
        let pinned = ApiVersionPolicy::pinned("2025-06-30").unwrap();
        let state = ApiVersionState::new(pinned);
        assert!(!state.fall_back_from("2025-06-30"));
        assert_eq!(state.current(), "2025-06-30");
        assert_eq!(ApiVersionPolicy::pinned("2099-01-01"), None);
    }
}
