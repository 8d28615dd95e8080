//! What happened and who must hear of it: the audit log and webhooks.
//!
//! Both are written with the change that causes them: a store method that
//! moves a connection takes a [`crate::store::Transition`] (audit event +
//! optional outbox event) and commits all three together.

pub mod audit;
mod delivery;
pub mod webhooks;
