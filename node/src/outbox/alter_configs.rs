//! Kafka's IncrementalAlterConfigs (KIP-339) for one topic, through librdkafka.
//!
//! Why by hand: the rdkafka crate wraps only the older AlterConfigs, which resets every setting
//! it does not name to the broker default and which nisshi does not implement; librdkafka has
//! IncrementalAlterConfigs, so this calls it through `rdkafka::bindings` (rdkafka-sys). It is the
//! only `unsafe` code in fovea: every pointer is created, used and destroyed here, and the call
//! blocks (run it on a blocking thread).
#![allow(unsafe_code)]

use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use std::ffi::{CStr, CString, c_char};
use std::time::Duration;

/// Sets `entries` on `topic`, leaving its other settings alone. `Err` names the broker's or
/// librdkafka's reason (e.g. an unsupported request or a policy violation).
pub fn set_topic_configs(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    entries: &[(&str, String)],
    timeout: Duration,
) -> Result<(), String> {
    let name = CString::new(topic).map_err(|e| e.to_string())?;
    let pairs = entries
        .iter()
        .map(|(k, v)| Ok((CString::new(*k)?, CString::new(v.as_str())?)))
        .collect::<Result<Vec<_>, std::ffi::NulError>>()
        .map_err(|e| e.to_string())?;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX - 1000);
    let rk = admin.inner().native_ptr();
    // SAFETY: `rk` is a live client for the whole call (borrowed from `admin`). The resource,
    // options and queue are created here and destroyed before returning on every path; librdkafka
    // copies the resource array in rd_kafka_IncrementalAlterConfigs (the caller keeps ownership),
    // and the event is destroyed after its strings were copied out. The CStrings outlive every
    // call that reads them.
    unsafe {
        let resource = rd::rd_kafka_ConfigResource_new(
            rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
            name.as_ptr(),
        );
        if resource.is_null() {
            return Err("librdkafka could not create the config resource".into());
        }
        for (key, value) in &pairs {
            let error = rd::rd_kafka_ConfigResource_add_incremental_config(
                resource,
                key.as_ptr(),
                rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                value.as_ptr(),
            );
            if !error.is_null() {
                let why = text(rd::rd_kafka_error_string(error));
                rd::rd_kafka_error_destroy(error);
                rd::rd_kafka_ConfigResource_destroy(resource);
                return Err(why);
            }
        }
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
        );
        let mut errstr = [0 as c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        let mut resources = [resource];
        rd::rd_kafka_IncrementalAlterConfigs(rk, resources.as_mut_ptr(), 1, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1000));
        let outcome = if event.is_null() {
            Err(format!("no answer within {} ms", timeout_ms))
        } else {
            let outcome = if rd::rd_kafka_event_error(event)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                Err(text(rd::rd_kafka_event_error_string(event)))
            } else {
                let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(event);
                let mut count = 0usize;
                let answers =
                    rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut count);
                (0..count)
                    .map(|i| *answers.add(i))
                    .find(|r| {
                        rd::rd_kafka_ConfigResource_error(*r)
                            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                    })
                    .map_or(Ok(()), |r| {
                        Err(text(rd::rd_kafka_ConfigResource_error_string(r)))
                    })
            };
            rd::rd_kafka_event_destroy(event);
            outcome
        };
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_ConfigResource_destroy(resource);
        outcome
    }
}

/// A librdkafka string (which may be null) as owned text.
///
/// # Safety
/// `s` is null or a NUL-terminated string that lives for the call.
unsafe fn text(s: *const c_char) -> String {
    if s.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: per this function's contract.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}
