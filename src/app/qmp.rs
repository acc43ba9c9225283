//! `qmp COMMAND [JSON]`: one QMP command by name, through the supervisor.

use anyhow::Result;
use serde_json::{json, Value};

use super::Ctx;
use crate::machine::Vm;
use crate::report::print_line;

/// `qmp COMMAND [JSON]`: QEMU's raw reply; a refusal is a typed failure.
pub fn qmp(ctx: &Ctx, command: &str, arguments: Option<&str>, timeout: std::time::Duration) -> Result<i32> {
    let args = parse_arguments(arguments).map_err(crate::report::error::Usage)?;
    let reply = Vm::running(&ctx.existing()?)?.execute_raw(command, args, timeout)?;
    print_line(&serde_json::to_string_pretty(&reply)?)?;
    Ok(0)
}

/// `qbuf-qemu qmp COMMAND [ARGS]`'s argument: a JSON object, or nothing.
pub fn parse_arguments(text: Option<&str>) -> Result<Value, String> {
    let Some(text) = text else { return Ok(json!({})) };
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(other) => Err(format!(
            "QMP arguments must be a JSON object, not {other}: e.g. '{{\"id\": \"disk1\"}}' (quote it for the shell)"
        )),
        Err(e) => Err(format!(
            "QMP arguments are not valid JSON ({e}): e.g. '{{\"id\": \"disk1\"}}' (quote it for the shell)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_must_be_a_json_object() {
        assert_eq!(parse_arguments(None).unwrap(), json!({}));
        assert_eq!(parse_arguments(Some(r#"{"id": "d1"}"#)).unwrap(), json!({"id": "d1"}));
        let e = parse_arguments(Some("{id: d1}")).unwrap_err();
        assert!(e.contains("not valid JSON") && e.contains("quote it"), "{e}");
        let e = parse_arguments(Some("[1]")).unwrap_err();
        assert!(e.contains("must be a JSON object"), "{e}");
    }
}
