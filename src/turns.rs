//! Calls resources back into the controller: the stream of passes it reconciles on besides
//! its watches.

use std::sync::Arc;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::cached::CachedIdentity;
use crate::crd::CommunicationIdentity;

/// Calls resources back: a pass that waits for an ACS budget returns instead of holding a
/// reconcile worker, and its turn ([`acs::Turn`]) sends it here, a stream that feeds the
/// called lane of `pass_queue`. Unbounded, yet no larger than the resources whose slot came up
/// meanwhile (the queue folds repeated triggers of one resource into one pass).
#[derive(Clone)]
pub struct Turns {
    sender: UnboundedSender<ObjectRef<CachedIdentity>>,
}

impl Turns {
    pub fn new() -> (Self, UnboundedReceiver<ObjectRef<CachedIdentity>>) {
        let (sender, receiver) = unbounded();
        (Self { sender }, receiver)
    }

    /// A reconcile of `resource` now.
    pub fn send(&self, resource: ObjectRef<CachedIdentity>) {
        // Fails only once the controller stopped, when no pass is wanted any more.
        let _ = self.sender.unbounded_send(resource);
    }

    /// The turn of `resource`: a reconcile of it.
    pub fn of(&self, resource: &CommunicationIdentity) -> acs::Turn {
        let turns = self.clone();
        let reference =
            ObjectRef::new(&resource.name_any()).within(&resource.namespace().unwrap_or_default());
        Arc::new(move || turns.send(reference.clone()))
    }
}
