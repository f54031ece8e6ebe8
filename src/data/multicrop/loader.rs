//! The prefetching loader: batches of consecutive steps built on a background thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use super::BatchSpec;
use super::batch::{CropBatch, OrderCache, build_batch_cached, invalid};
use super::source::ImageSource;
use crate::data::DataError;

/// Builds the batches of consecutive steps on a background thread (each batch in parallel on
/// the rayon pool), keeping up to `prefetch` finished batches ready.
///
/// Dropping the loader stops the thread; it waits for the batch under construction.
pub struct CropLoader {
    rx: Option<Receiver<Result<CropBatch, DataError>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    next_step: u64,
    spawn_error: Option<String>,
}

impl CropLoader {
    /// Starts building the batches of steps `start_step`, `start_step + 1`, ... of `spec`
    /// over `source`. `prefetch` is the number of finished batches that may wait (0: each
    /// batch is handed over as soon as it is built, and the next one starts after that).
    pub fn new(source: Arc<dyn ImageSource>, spec: BatchSpec, start_step: u64, prefetch: usize) -> Self {
        let (tx, rx) = sync_channel(prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let spawned = std::thread::Builder::new().name("explora-crops".to_string()).spawn(move || {
            let mut cache = OrderCache::default();
            let mut step = start_step;
            while !stop_flag.load(Ordering::Relaxed) {
                let result = build_batch_cached(source.as_ref(), &spec, step, &mut cache);
                let failed = result.is_err();
                // A failed send means the loader was dropped; an error ends the stream.
                if tx.send(result).is_err() || failed {
                    break;
                }
                step += 1;
            }
        });
        let (handle, spawn_error) = match spawned {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(e.to_string())),
        };
        CropLoader { rx: Some(rx), stop, handle, next_step: start_step, spawn_error }
    }

    /// The next batch, in step order; waits for it if needed. After an error (which ends the
    /// stream) every call returns an error.
    #[allow(clippy::should_implement_trait)] // a fallible `next`, not an iterator
    pub fn next(&mut self) -> Result<CropBatch, DataError> {
        match self.rx.as_ref().and_then(|rx| rx.recv().ok()) {
            Some(Ok(batch)) => {
                self.next_step = batch.step + 1;
                Ok(batch)
            }
            Some(Err(e)) => Err(e),
            None => Err(invalid(match &self.spawn_error {
                Some(e) => format!("cannot start the batch loader thread: {e}"),
                None => "the batch loader has stopped (after an earlier error)".to_string(),
            })),
        }
    }

    /// The step of the batch [`CropLoader::next`] returns next.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }
}

impl Drop for CropLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver makes a pending send fail, so the thread exits.
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_batch;
    use super::super::tests::{Recording, procedural, small_spec};
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn loader_yields_build_batch_in_order_and_resumes() {
        let source: Arc<dyn ImageSource> = Arc::new(procedural(10));
        let spec = BatchSpec { preview_every: 2, ..small_spec(3) };
        let mut loader = CropLoader::new(source.clone(), spec.clone(), 0, 2);
        for step in 0..4 {
            assert_eq!(loader.next_step(), step);
            let b = loader.next().unwrap();
            assert_eq!(b.step, step);
            assert_eq!(b.preview.is_some(), step % 2 == 0);
            assert_eq!(b, build_batch(source.as_ref(), &spec, step).unwrap());
        }
        drop(loader); // stops the producer (it may be blocked on a full channel)

        let mut resumed = CropLoader::new(source.clone(), spec.clone(), 7, 0);
        assert_eq!(resumed.next().unwrap(), build_batch(source.as_ref(), &spec, 7).unwrap());
        assert_eq!(resumed.next().unwrap().step, 8);
    }

    #[test]
    fn loader_reports_errors_then_stops() {
        let broken: Arc<dyn ImageSource> = Arc::new(Recording { count: 2, loaded: Mutex::default(), broken: vec![0, 1] });
        let mut loader = CropLoader::new(broken, small_spec(2), 0, 1);
        let err = loader.next().unwrap_err();
        assert!(err.to_string().contains("could not be read"), "{err}");
        assert!(loader.next().unwrap_err().to_string().contains("stopped"));
    }
}
