/* The TCP_REPAIR restore steps of nonstop.session.repair in one call per socket.
 *
 * repair.py's _prepare and _go_live make 15-20 system calls per connection; in Python each one
 * costs more than the kernel's work (measured here at 5,000 connections: 22-26 us of user time
 * and 14-20 us of system time per socket). These two functions make the same calls, in the same
 * order, from C. repair.py decides everything (what to refill, which options, whether to
 * resend) and passes the results; nothing here knows more about TCP than the call sequence.
 *
 * prepare(family, src, sport, dst, dport, nonblock, sndbuf, rcvbuf, freebind, send_seq,
 *         recv_seq, mss, md5sig, opts, has_ts, ts, recv_q, sent_q, window) -> fd | (step, errno)
 *   A socket in repair mode, bound and connected, its queues refilled; nothing sent yet.
 *   sndbuf/rcvbuf 0: not set. md5sig: struct tcp_md5sig bytes or None. opts: the
 *   struct tcp_repair_opt array. window: (snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup) or
 *   None. On failure the socket is closed (in repair mode: nothing reaches the peer) and the
 *   step's name and errno come back, as repair.RepairError names them.
 * go_live(fd, unsent, nodelay) -> None | (step, errno)
 *   Repair off (the window probe leaves), SO_REUSEADDR, then ``unsent`` sent as new data
 *   (with TCP_NODELAY around it when ``nodelay``). The fd stays open on failure (the caller's
 *   socket object owns it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef TCP_REPAIR
#define TCP_REPAIR 19
#endif
#ifndef TCP_REPAIR_QUEUE
#define TCP_REPAIR_QUEUE 20
#endif
#ifndef TCP_QUEUE_SEQ
#define TCP_QUEUE_SEQ 21
#endif
#ifndef TCP_REPAIR_OPTIONS
#define TCP_REPAIR_OPTIONS 22
#endif
#ifndef TCP_TIMESTAMP
#define TCP_TIMESTAMP 24
#endif
#ifndef TCP_REPAIR_WINDOW
#define TCP_REPAIR_WINDOW 29
#endif
#ifndef TCP_MD5SIG
#define TCP_MD5SIG 14
#endif
#ifndef IP_TRANSPARENT
#define IP_TRANSPARENT 19
#endif
#ifndef IPV6_TRANSPARENT
#define IPV6_TRANSPARENT 75
#endif
#ifndef SO_SNDBUFFORCE
#define SO_SNDBUFFORCE 32
#endif
#ifndef SO_RCVBUFFORCE
#define SO_RCVBUFFORCE 33
#endif
#define Q_RECV 1
#define Q_SEND 2

static int set_int(int fd, int level, int opt, int value)
{
    return setsockopt(fd, level, opt, &value, sizeof value);
}

static int set_u32(int fd, int level, int opt, unsigned int value)
{
    return setsockopt(fd, level, opt, &value, sizeof value);
}

/* SO_*BUFFORCE (beyond wmem_max/rmem_max: needs CAP_NET_ADMIN), else the plain option */
static int force_buf(int fd, int force_opt, int opt, int size)
{
    if (size == 0)
        return 0;
    if (set_int(fd, SOL_SOCKET, force_opt, size) == 0)
        return 0;
    if (errno != EPERM)
        return -1;
    return set_int(fd, SOL_SOCKET, opt, size);
}

static int fill(int fd, const char *p, Py_ssize_t n)
{
    while (n > 0) {
        ssize_t k = send(fd, p, (size_t)n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += k;
        n -= k;
    }
    return 0;
}

/* sockaddr for (address text, port); 0 on success, -1 (errno EINVAL) when the text is not an
 * address of the family (the caller falls back to Python, which knows scope ids) */
static int make_addr(int family, const char *text, int port, struct sockaddr_storage *ss,
                     socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, text, &a->sin_addr) != 1)
            goto bad;
        *len = sizeof *a;
        return 0;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((unsigned short)port);
        if (inet_pton(AF_INET6, text, &a->sin6_addr) != 1)
            goto bad;
        *len = sizeof *a;
        return 0;
    }
bad:
    errno = EINVAL;
    return -1;
}

static PyObject *failed(const char *step, int err)
{
    return Py_BuildValue("(si)", step, err);
}

static PyObject *prepare(PyObject *self, PyObject *args)
{
    int family, sport, dport, nonblock, sndbuf, rcvbuf, freebind, mss, has_ts;
    unsigned int send_seq, recv_seq, ts;
    const char *src, *dst;
    PyObject *md5sig, *window;
    Py_buffer opts, recv_q, sent_q;
    unsigned int win[5];
    struct sockaddr_storage local, peer;
    socklen_t local_len, peer_len;
    const char *step = "repair on";
    int fd, err;

    if (!PyArg_ParseTuple(args, "isisipiipIIiOy*pIy*y*O", &family, &src, &sport, &dst, &dport,
                          &nonblock, &sndbuf, &rcvbuf, &freebind, &send_seq, &recv_seq, &mss,
                          &md5sig, &opts, &has_ts, &ts, &recv_q, &sent_q, &window))
        return NULL;
    if (window != Py_None &&
        !PyArg_ParseTuple(window, "IIIII", &win[0], &win[1], &win[2], &win[3], &win[4]))
        goto bad_args;
    if (md5sig != Py_None && !PyBytes_Check(md5sig)) {
        PyErr_SetString(PyExc_TypeError, "md5sig: bytes or None");
        goto bad_args;
    }
    if (make_addr(family, src, sport, &local, &local_len) < 0 ||
        make_addr(family, dst, dport, &peer, &peer_len) < 0) {
        PyBuffer_Release(&opts);
        PyBuffer_Release(&recv_q);
        PyBuffer_Release(&sent_q);
        return failed("address", EINVAL);
    }

    fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) {
        step = "socket";
        goto fail_nofd;
    }
    if (set_int(fd, IPPROTO_TCP, TCP_REPAIR, 1) < 0)
        goto fail;
    step = "socket buffers";
    if (force_buf(fd, SO_SNDBUFFORCE, SO_SNDBUF, sndbuf) < 0 ||
        force_buf(fd, SO_RCVBUFFORCE, SO_RCVBUF, rcvbuf) < 0)
        goto fail;
    if (freebind) {
        step = "IP_TRANSPARENT";
        if ((family == AF_INET6 ? set_int(fd, IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                                : set_int(fd, IPPROTO_IP, IP_TRANSPARENT, 1)) < 0)
            goto fail;
    }
    step = "send queue seq";
    if (set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_SEND) < 0 ||
        set_u32(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, send_seq) < 0)
        goto fail;
    step = "recv queue seq";
    if (set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_RECV) < 0 ||
        set_u32(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, recv_seq) < 0)
        goto fail;
    step = "TCP_MAXSEG";
    if (set_int(fd, IPPROTO_TCP, TCP_MAXSEG, mss) < 0)
        goto fail;
    step = "bind";
    if (bind(fd, (struct sockaddr *)&local, local_len) < 0)
        goto fail;
    step = "connect";
    if (connect(fd, (struct sockaddr *)&peer, peer_len) < 0)
        goto fail;
    if (md5sig != Py_None) {
        step = "TCP_MD5SIG";
        if (setsockopt(fd, IPPROTO_TCP, TCP_MD5SIG, PyBytes_AS_STRING(md5sig),
                       (socklen_t)PyBytes_GET_SIZE(md5sig)) < 0)
            goto fail;
    }
    step = "TCP_REPAIR_OPTIONS";
    if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPTIONS, opts.buf, (socklen_t)opts.len) < 0)
        goto fail;
    if (has_ts) {
        step = "TCP_TIMESTAMP";
        if (set_u32(fd, IPPROTO_TCP, TCP_TIMESTAMP, ts) < 0)
            goto fail;
    }
    if (recv_q.len > 0) {
        step = "refill recv queue";  /* still TCP_RECV_QUEUE */
        if (fill(fd, recv_q.buf, recv_q.len) < 0)
            goto fail;
    }
    if (sent_q.len > 0) {
        step = "refill send queue";
        if (set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_SEND) < 0 ||
            fill(fd, sent_q.buf, sent_q.len) < 0)
            goto fail;
    }
    if (window != Py_None) {
        step = "TCP_REPAIR_WINDOW";
        if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, win, sizeof win) < 0)
            goto fail;
    }
    PyBuffer_Release(&opts);
    PyBuffer_Release(&recv_q);
    PyBuffer_Release(&sent_q);
    {
        PyObject *out = PyLong_FromLong(fd);
        if (out == NULL)
            close(fd);  /* still in repair mode: nothing reaches the peer */
        return out;
    }

fail:
    err = errno;
    close(fd);  /* in repair mode: nothing reaches the peer */
    errno = err;
fail_nofd:
    err = errno;
    PyBuffer_Release(&opts);
    PyBuffer_Release(&recv_q);
    PyBuffer_Release(&sent_q);
    return failed(step, err);

bad_args:
    PyBuffer_Release(&opts);
    PyBuffer_Release(&recv_q);
    PyBuffer_Release(&sent_q);
    return NULL;
}

static PyObject *go_live(PyObject *self, PyObject *args)
{
    int fd, nodelay;
    Py_buffer unsent;
    const char *step = "repair off";
    int err;

    if (!PyArg_ParseTuple(args, "iy*p", &fd, &unsent, &nodelay))
        return NULL;
    if (set_int(fd, IPPROTO_TCP, TCP_REPAIR, 0) < 0)
        goto fail;
    step = "SO_REUSEADDR";  /* in repair mode it would undo the forced reuse and break bind */
    if (set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1) < 0)
        goto fail;
    if (unsent.len > 0) {
        step = "send unsent tail";
        if (nodelay && set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1) < 0)
            goto fail;
        if (fill(fd, unsent.buf, unsent.len) < 0)
            goto fail;
        if (nodelay && set_int(fd, IPPROTO_TCP, TCP_NODELAY, 0) < 0)
            goto fail;
    }
    PyBuffer_Release(&unsent);
    Py_RETURN_NONE;

fail:
    err = errno;
    PyBuffer_Release(&unsent);
    return failed(step, err);
}

static PyMethodDef methods[] = {
    {"prepare", prepare, METH_VARARGS,
     "A socket in repair mode with the connection's state: fd, or (step, errno)."},
    {"go_live", go_live, METH_VARARGS,
     "Repair off, then the never-sent bytes: None, or (step, errno)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_repair",
    "TCP_REPAIR restore steps in C (see nonstop.session.repair).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__repair(void)
{
    return PyModule_Create(&module);
}
