//! The tc side of the tcfilter model: an ingress qdisc on a device and a u32
//! match-all filter whose `mirred egress redirect` action sends every frame
//! to another device. Capsule's filters sit at [`FILTER_PRIORITY`] and
//! their action carries [`COOKIE`], which is how teardown tells them from
//! anyone else's.
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use crate::error::Result;
use crate::nl::{errno, Nl};

/// The priority (`pref`) of capsule's filters.
pub const FILTER_PRIORITY: u16 = 0x4350;
/// The cookie on capsule's mirred actions (16 bytes, the kernel's maximum).
pub const COOKIE: &[u8; 16] = b"capsule-tcfilter";
/// ETH_P_ALL in network byte order, as tc wants the protocol.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();
/// `ffff:fff2`: the ingress hook, for an `ingress` or a `clsact` qdisc.
const FILTER_PARENT: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_INGRESS,
};
/// `ffff:`, the handle of an ingress qdisc.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// A filter found at the ingress hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IngressFilter {
    pub priority: u16,
    pub kind: String,
    /// Where its mirred action redirects to (0: the device is gone).
    pub redirect_to: Option<u32>,
    pub capsule: bool,
}

fn qdisc_msg(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = INGRESS_HANDLE;
    m
}

/// The kind of the qdisc at the ingress hook of `index` (`ingress`,
/// `clsact`), if there is one.
pub(crate) async fn ingress_qdisc(nl: &Nl, index: u32, what: &str) -> Result<Option<String>> {
    let op = format!("{what}: list qdiscs");
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::UNSPEC;
    let msgs = nl
        .raw(
            &op,
            RouteNetlinkMessage::GetQueueDiscipline(m),
            NLM_F_REQUEST | NLM_F_DUMP,
        )
        .await?
        .map_err(|e| nl.error(&op, e))?;
    Ok(msgs.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewQueueDiscipline(q)
            if q.header.index == index as i32 && q.header.parent == TcHandle::INGRESS =>
        {
            q.attributes.iter().find_map(|a| match a {
                TcAttribute::Kind(k) => Some(k.clone()),
                _ => None,
            })
        }
        _ => None,
    }))
}

/// Adds an ingress qdisc to `index`; `false` when the device already had a
/// qdisc at its ingress hook (then it is not capsule's).
pub(crate) async fn add_ingress_qdisc(nl: &Nl, index: u32, what: &str) -> Result<bool> {
    let op = format!("{what}: add ingress qdisc");
    let mut m = qdisc_msg(index);
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    match nl
        .raw(
            &op,
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .await?
    {
        Ok(_) => Ok(true),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(nl.error(&op, e)),
    }
}

/// Deletes the ingress qdisc of `index` (with all its filters); `false`
/// when there was none.
pub(crate) async fn del_ingress_qdisc(nl: &Nl, index: u32, what: &str) -> Result<bool> {
    let op = format!("{what}: delete ingress qdisc");
    let mut m = qdisc_msg(index);
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    match nl
        .raw(
            &op,
            RouteNetlinkMessage::DelQueueDiscipline(m),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .await?
    {
        Ok(_) => Ok(true),
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => {
            Ok(false)
        }
        Err(e) => Err(nl.error(&op, e)),
    }
}

/// `u32 match u32 0 0 action mirred egress redirect dev <to>` at the
/// ingress hook of `from`, with capsule's priority and cookie.
pub(crate) async fn add_redirect(nl: &Nl, from: u32, to: u32, what: &str) -> Result<()> {
    let op = format!("{what}: add redirect filter");
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = FILTER_PARENT;
    m.header.info = (u32::from(FILTER_PRIORITY) << 16) | u32::from(ETH_P_ALL_BE);
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys = vec![TcU32Key::default()];
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Cookie(COOKIE.to_vec()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    m.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(sel)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    nl.raw(
        &op,
        RouteNetlinkMessage::NewTrafficFilter(m),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .await?
    .map_err(|e| nl.error(&op, e))?;
    Ok(())
}

fn parse_filter(m: &TcMessage) -> IngressFilter {
    let mut f = IngressFilter {
        priority: (m.header.info >> 16) as u16,
        kind: String::new(),
        redirect_to: None,
        capsule: false,
    };
    for a in &m.attributes {
        match a {
            TcAttribute::Kind(k) => f.kind = k.clone(),
            TcAttribute::Options(opts) => {
                for o in opts {
                    if let TcOption::U32(TcFilterU32Option::Action(actions)) = o {
                        for act in actions {
                            for aa in &act.attributes {
                                match aa {
                                    TcActionAttribute::Cookie(c) => {
                                        f.capsule |= c.as_slice() == COOKIE.as_slice()
                                    }
                                    TcActionAttribute::Options(ao) => {
                                        for x in ao {
                                            if let TcActionOption::Mirror(
                                                TcActionMirrorOption::Parms(p),
                                            ) = x
                                            {
                                                f.redirect_to = Some(p.ifindex);
                                            }
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// The filters at the ingress hook of `index` (empty when it has no
/// ingress qdisc). A u32 filter shows up as several messages (its hash
/// table, then its keys): they are merged per priority.
pub(crate) async fn ingress_filters(nl: &Nl, index: u32, what: &str) -> Result<Vec<IngressFilter>> {
    let op = format!("{what}: list ingress filters");
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = FILTER_PARENT;
    let msgs = match nl
        .raw(
            &op,
            RouteNetlinkMessage::GetTrafficFilter(m),
            NLM_F_REQUEST | NLM_F_DUMP,
        )
        .await?
    {
        Ok(m) => m,
        // No ingress qdisc: nothing to list.
        Err(e) if matches!(errno(&e), Some(libc::EINVAL | libc::ENOENT)) => return Ok(vec![]),
        Err(e) => return Err(nl.error(&op, e)),
    };
    let mut out: Vec<IngressFilter> = Vec::new();
    for msg in msgs {
        let RouteNetlinkMessage::NewTrafficFilter(t) = msg else {
            continue;
        };
        if t.header.index != index as i32 {
            continue;
        }
        let f = parse_filter(&t);
        match out
            .iter_mut()
            .find(|o| o.priority == f.priority && o.kind == f.kind)
        {
            Some(o) => {
                o.capsule |= f.capsule;
                o.redirect_to = o.redirect_to.or(f.redirect_to);
            }
            None => out.push(f),
        }
    }
    Ok(out)
}

/// Deletes the filters at `priority` of the ingress hook of `index`;
/// `false` when there were none.
pub(crate) async fn del_filters(nl: &Nl, index: u32, priority: u16, what: &str) -> Result<bool> {
    let op = format!("{what}: delete filter pref {priority}");
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = FILTER_PARENT;
    m.header.info = (u32::from(priority) << 16) | u32::from(ETH_P_ALL_BE);
    match nl
        .raw(
            &op,
            RouteNetlinkMessage::DelTrafficFilter(m),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .await?
    {
        Ok(_) => Ok(true),
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
        Err(e) => Err(nl.error(&op, e)),
    }
}
