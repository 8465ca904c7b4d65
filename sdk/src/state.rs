//! The plugin instance behind the export macros.
//!
//! WIT exports are free functions, while plugin authors write a type with state. The
//! instance built by `init` lives here until the gateway drops the whole component
//! instance; each instance is single-threaded, so a thread-local cell is enough.

use std::any::Any;
use std::cell::RefCell;

use crate::{Config, Decision, Message, Outcome, Route, Transform};

thread_local! {
    static PLUGIN: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Builds the plugin with `make` and keeps it for the calls that follow.
pub fn init<P: 'static>(
    pairs: Vec<(String, String)>,
    make: fn(&Config) -> Result<P, String>,
) -> Result<(), String> {
    let plugin = make(&Config::new(pairs))?;
    PLUGIN.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

fn with_plugin<P: 'static, R>(f: impl FnOnce(&mut P) -> R) -> Option<R> {
    PLUGIN.with(|slot| slot.borrow_mut().as_mut()?.downcast_mut::<P>().map(f))
}

const NOT_INITIALISED: &str = "plugin called before init";

/// Runs a transform plugin over one batch.
pub fn run_transform<P: Transform>(batch: Vec<Message>) -> Vec<Outcome> {
    let count = batch.len();
    with_plugin(|plugin: &mut P| plugin.transform_batch(batch)).unwrap_or_else(|| {
        (0..count)
            .map(|_| Outcome::Fail(NOT_INITIALISED.to_string()))
            .collect()
    })
}

/// Runs a router plugin over one batch.
pub fn run_router<P: Route>(batch: Vec<Message>) -> Vec<Decision> {
    with_plugin(|plugin: &mut P| plugin.route_batch(&batch)).unwrap_or_else(|| {
        batch
            .iter()
            .map(|_| Decision::builtin(NOT_INITIALISED))
            .collect()
    })
}
