//! Who is told when an application changes: `WatchApplication` streams, and `SubmitApplication`
//! calls waiting for the home bureau's answer.
//!
//! A committed change only marks its application. One task reads each marked application once
//! per burst of marks, and only while someone watches it, then broadcasts the view. Reading the
//! application on every change, watched or not, cost three queries per step of every application.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError, Weak},
};

use tokio::sync::{broadcast, mpsc};

use crate::service::{ApplicationView, Inner, Intake};

pub(crate) struct Watchers {
    views: broadcast::Sender<ApplicationView>,
    /// How many watchers each application has.
    watched: Mutex<HashMap<String, usize>>,
    marked: mpsc::UnboundedSender<String>,
}

/// One watcher of one application: its views arrive on `views` (filtered by id by the watcher),
/// and the application stays watched until this is dropped.
pub(crate) struct Watching {
    watchers: Arc<Watchers>,
    application_id: String,
    pub views: broadcast::Receiver<ApplicationView>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut watched = self.watchers.watched.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = watched.get_mut(&self.application_id) {
            *count -= 1;
            if *count == 0 {
                watched.remove(&self.application_id);
            }
        }
    }
}

impl Watchers {
    /// The watchers, and the receiving end of the marks, for [`publish_marked`].
    pub(crate) fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (views, _) = broadcast::channel(256);
        let (marked, receiver) = mpsc::unbounded_channel();
        (Arc::new(Self { views, watched: Mutex::new(HashMap::new()), marked }), receiver)
    }

    /// Starts watching `application_id`. Subscribe before reading its current state, so that no
    /// change committed in between is missed.
    pub(crate) fn watch(self: &Arc<Self>, application_id: &str) -> Watching {
        let views = self.views.subscribe();
        *self.watched.lock().unwrap_or_else(PoisonError::into_inner).entry(application_id.to_owned()).or_default() += 1;
        Watching { watchers: Arc::clone(self), application_id: application_id.to_owned(), views }
    }

    fn is_watched(&self, application_id: &str) -> bool {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner).contains_key(application_id)
    }

    /// The application changed (committed): its watchers, if any, will be sent its new view.
    pub(crate) fn mark(&self, application_id: &str) {
        if self.is_watched(application_id) {
            // Closed only when the station is being dropped: nobody is left to tell.
            let _ = self.marked.send(application_id.to_owned());
        }
    }
}

/// Reads and broadcasts marked applications until the station is dropped. Marks that arrive while
/// a batch is read are taken together in the next one, so a burst of changes to one application
/// costs one read, and the applications of a batch are read together (three queries); each read
/// starts after the marks it answers, so no change is missed.
pub(crate) async fn publish_marked(station: Weak<Inner>, mut marked: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = marked.recv().await {
        let mut batch = BTreeSet::from([first]);
        while let Ok(next) = marked.try_recv() {
            batch.insert(next);
        }
        let Some(inner) = station.upgrade() else { return };
        let intake = Intake { inner };
        let watched: Vec<String> = batch.into_iter().filter(|id| intake.inner.watchers.is_watched(id)).collect();
        match intake.views(&watched).await {
            Ok(views) => {
                for view in views {
                    // No receiver is not an error: the watcher has just gone.
                    drop(intake.inner.watchers.views.send(view));
                }
            }
            Err(error) => tracing::warn!(applications = ?watched, %error, "could not publish a change"),
        }
    }
}
