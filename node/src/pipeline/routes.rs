//! Which models run on which camera: the config's `[[routes]]`, first match wins.

use crate::config::Route;
use crate::inference::Model;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(String, Vec<Arc<Model>>)>,
}

impl Router {
    /// Resolves the model names of every route against the loaded models; returns every unknown
    /// name at once as `routes[i].models[j]: ...` messages.
    pub fn new(routes: &[Route], models: &[Arc<Model>]) -> Result<Router, Vec<String>> {
        let mut errors = Vec::new();
        let mut resolved = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let mut chosen = Vec::new();
            for (j, name) in route.models.iter().enumerate() {
                match models.iter().find(|m| &m.name == name) {
                    Some(m) => chosen.push(m.clone()),
                    None => errors.push(format!(
                        "routes[{i}].models[{j}]: no loaded model is named {name:?} (loaded: {})",
                        models
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            }
            resolved.push((route.cameras.clone(), chosen));
        }
        if errors.is_empty() {
            Ok(Router { routes: resolved })
        } else {
            Err(errors)
        }
    }

    /// The models for `camera`; empty when no route matches.
    pub fn models_for(&self, camera: &str) -> &[Arc<Model>] {
        self.routes
            .iter()
            .find(|(pattern, _)| glob_match(pattern, camera))
            .map(|(_, models)| models.as_slice())
            .unwrap_or(&[])
    }
}

/// `*` matches any run of characters (also none); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or("");
    for part in parts {
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*", ""));
        assert!(glob_match("cam-1", "cam-1"));
        assert!(!glob_match("cam-1", "cam-10"));
        assert!(glob_match("dock-*", "dock-3"));
        assert!(!glob_match("dock-*", "door-3"));
        assert!(glob_match("*-east", "gate-east"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
