//! Putting a translation into a running gateway, and reporting its problems.

use std::collections::BTreeMap;

use gateway_core::Gateway;
use gateway_core::config::{Config, ConfigError};
use gateway_core::observe::Rejected;

use crate::objects::{ManifestProblem, Objects};
use crate::translate::{ObjectProblem, Options, Translation, translate, translate_checked};

/// Applies successive object sets to one gateway: translates, swaps the config in when it
/// changed (through `Gateway::reload`, the same path as a file reload), logs problems as they
/// appear and disappear, and exports them as `gateway_source_objects_rejected`.
pub struct Applier {
    gateway: Gateway,
    options: Options,
    last: Option<Config>,
    problems: Vec<ObjectProblem>,
    manifest_problems: Vec<ManifestProblem>,
}

/// What one [`Applier::apply`] did.
#[derive(Debug)]
pub enum Applied {
    /// The config changed and the gateway serves it now.
    Reloaded(Translation),
    /// The objects translate to the config already served.
    Unchanged(Translation),
}

impl Applied {
    /// The translation, either way.
    pub fn translation(&self) -> &Translation {
        match self {
            Applied::Reloaded(t) | Applied::Unchanged(t) => t,
        }
    }
}

impl Applier {
    /// An applier for `gateway`.
    pub fn new(gateway: Gateway, options: Options) -> Self {
        Applier { gateway, options, last: None, problems: Vec::new(), manifest_problems: Vec::new() }
    }

    /// The options translations use.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Translates `objects` and serves the result. Objects the gateway refuses lose their own
    /// routes only (see [`translate_checked`]); `Err` means the config could not be made to
    /// compile at all, and the previous one keeps serving.
    pub fn apply(
        &mut self,
        objects: &Objects,
        manifest_problems: Vec<ManifestProblem>,
    ) -> Result<Applied, ConfigError> {
        let plain = translate(objects, &self.options);
        let result = if self.last.as_ref() == Some(&plain.config) {
            // Same objects as what is served: the problems found when it was compiled still hold.
            let mut t = plain;
            t.problems.clone_from(&self.problems);
            Ok(Applied::Unchanged(t))
        } else {
            let gateway = &self.gateway;
            translate_checked(objects, &self.options, |config| {
                gateway.reload(config).map(|()| gateway.plugin_failures())
            })
            .map(|t| {
                self.last = Some(plain.config);
                Applied::Reloaded(t)
            })
        };
        if let Ok(applied) = &result {
            self.report(&applied.translation().problems, manifest_problems);
        }
        result
    }

    fn report(&mut self, problems: &[ObjectProblem], manifest_problems: Vec<ManifestProblem>) {
        for p in manifest_problems.iter().filter(|p| !self.manifest_problems.contains(p)) {
            tracing::warn!(source = %p.source, "{}", p.message);
        }
        for p in problems.iter().filter(|p| !self.problems.contains(p)) {
            tracing::warn!(object = %p.object, "{}", p.message);
        }
        for p in self.problems.iter().filter(|p| !problems.contains(p)) {
            tracing::info!(object = %p.object, "resolved: {}", p.message);
        }
        let mut counts: BTreeMap<(String, &'static str), BTreeMap<String, ()>> = BTreeMap::new();
        for p in problems {
            counts.entry((p.object.kind.clone(), p.reason())).or_default().insert(p.object.to_string(), ());
        }
        let mut rejected: Vec<Rejected> = counts
            .into_iter()
            .map(|((kind, reason), objects)| Rejected { kind, reason: reason.into(), count: objects.len() as u64 })
            .collect();
        if !manifest_problems.is_empty() {
            rejected.push(Rejected {
                kind: "Manifest".into(),
                reason: "unreadable".into(),
                count: manifest_problems.len() as u64,
            });
        }
        self.gateway.set_rejected(rejected);
        self.problems = problems.to_vec();
        self.manifest_problems = manifest_problems;
    }
}
