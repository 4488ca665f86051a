/* fable's LD_PRELOAD library for `fable run` (DESIGN.md §8, docs/architecture.md "fable run").
 *
 * An unmodified program keeps its loopback TCP sockets, except that a connection between two
 * programs run under `fable run` is swapped at setup for a unix socketpair the daemon made:
 * the library dup3()s one end over the program's fd, so every later call (read/write,
 * send/recv, poll/select/epoll, fcntl, dup, fork, sendfile, shutdown, close) is the kernel's,
 * unchanged. Policy and every check live in the daemon (src/fable/daemon/ports.py); this file
 * only asks it. Budget: 650 lines (tests/test_run.py). No Python API: it is never imported.
 *
 * Interposed, and nothing else:
 *   listen              a TCP listener on a loopback or wildcard address is registered with the
 *                       daemon (port_listen, the listening fd attached); it keeps listening on
 *                       TCP, so programs outside fable still reach it.
 *   connect             to a loopback address: the fd goes to the daemon (port_connect; it binds
 *                       a paired one to a loopback port) BEFORE the TCP connect, so the daemon
 *                       knows the pair when the listener accepts; then the TCP connect
 *                       (the doorbell: it keeps the listen backlog's order and errors) and, once
 *                       it is established, the unix end is dup3()ed over the fd.
 *   accept, accept4     a connection from a loopback peer on a registered listener: the accepted
 *                       fd goes to the daemon (port_accept); a paired one is swapped the same way.
 *   getsockname, getpeername   a swapped fd answers with the TCP addresses it had.
 *   getaddrinfo         NAME.fable (reserved, never asked of DNS): the loopback address if a
 *                       program run with `fable run --name NAME` listens (port_resolve), else
 *                       EAI_NONAME; every other name goes to libc untouched.
 *   setsockopt, getsockopt     IPPROTO_TCP/IP/IPV6 options of a swapped fd are remembered and
 *                       succeed (nginx closes a connection whose TCP_NODELAY fails); SO_DOMAIN and
 *                       SO_PROTOCOL answer for the TCP socket it was.
 *
 * Anything else stays plain TCP: UDP, a server on another address, a socket already in an
 * epoll set when it connects (epoll would go on watching the TCP socket; found in
 * /proc/self/fdinfo at connect, so nothing on the data path pays for it), a daemon that does
 * not answer (the program behaves as without fable), any error on the way. State per fd is keyed by
 * the socket's inode, so a closed and reused fd number (close, close_range, dup2) never inherits
 * another socket's state. The daemon is reached afresh for each request (no fd is kept open,
 * nothing to fix after fork; each request is one connection: hello, the op, two replies).
 *
 * Environment (set by `fable run`): FABLE_RUN_SOCKET the daemon's socket, FABLE_RUN_NAME the
 * name of this program's end in `fable flows`, FABLE_RUN_DEBUG=1 a line on stderr per decision.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define CALL_TIMEOUT_S 2 /* a daemon that does not answer in this time: plain TCP */
#define MAX_REPLY 4096
#define NOPTS 8 /* socket options remembered per swapped fd */

/* ---------------------------------------------------------------------------- per-fd state */
enum { F_LISTEN = 1, F_SWAPPED = 2 };

struct fdstate {
    uint8_t flags;
    ino_t ino; /* the socket these flags are about (F_LISTEN: the listener, F_SWAPPED: the unix
                  end); any other inode under this fd number is a new socket */
    socklen_t llen, plen;
    struct sockaddr_in6 local, peer; /* the TCP addresses (sockaddr_in fits too) */
    int nopts;
    int opt_level[NOPTS], opt_name[NOPTS], opt_val[NOPTS];
};

#define CHUNK 1024
#define NCHUNKS 1024 /* fds below 2^20; a higher fd is never swapped */
static struct fdstate *chunks[NCHUNKS];

static struct fdstate *slot(int fd, int create) {
    if (fd < 0 || fd >= CHUNK * NCHUNKS) return NULL;
    struct fdstate **c = &chunks[fd / CHUNK];
    struct fdstate *p = __atomic_load_n(c, __ATOMIC_ACQUIRE);
    if (p == NULL && create) {
        struct fdstate *fresh = calloc(CHUNK, sizeof *fresh);
        if (fresh == NULL) return NULL;
        /* SYNC POINT: pairs with the acquire load above in other threads */
        if (__atomic_compare_exchange_n(c, &p, fresh, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            p = fresh;
        else
            free(fresh);
    }
    return p == NULL ? NULL : &p[fd % CHUNK];
}

static ino_t inode_of(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

/* the state of fd if it is still the socket that flag was set for */
static struct fdstate *holds(int fd, int flag) {
    struct fdstate *s = slot(fd, 0);
    if (s == NULL || !(s->flags & flag)) return NULL;
    return inode_of(fd) == s->ino ? s : NULL;
}

/* ------------------------------------------------------------------------- the real calls */
static int (*real_listen)(int, int);
static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*real_getsockname)(int, struct sockaddr *, socklen_t *);
static int (*real_getpeername)(int, struct sockaddr *, socklen_t *);
static int (*real_setsockopt)(int, int, int, const void *, socklen_t);
static int (*real_getsockopt)(int, int, int, void *, socklen_t *);
static int (*real_getaddrinfo)(const char *, const char *, const struct addrinfo *,
                               struct addrinfo **);

static char daemon_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char my_name[65];
static int debug;

static void resolve(void) {
    real_listen = dlsym(RTLD_NEXT, "listen");
    real_connect = dlsym(RTLD_NEXT, "connect");
    real_accept = dlsym(RTLD_NEXT, "accept");
    real_accept4 = dlsym(RTLD_NEXT, "accept4");
    real_getsockname = dlsym(RTLD_NEXT, "getsockname");
    real_getpeername = dlsym(RTLD_NEXT, "getpeername");
    real_setsockopt = dlsym(RTLD_NEXT, "setsockopt");
    real_getsockopt = dlsym(RTLD_NEXT, "getsockopt");
    real_getaddrinfo = dlsym(RTLD_NEXT, "getaddrinfo");
}

/* the name grammar's characters: what goes into JSON as it is */
static int name_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
}

__attribute__((constructor)) static void shim_init(void) {
    resolve();
    const char *p = getenv("FABLE_RUN_SOCKET");
    if (p != NULL && strlen(p) < sizeof daemon_path) strcpy(daemon_path, p);
    const char *n = getenv("FABLE_RUN_NAME");
    if (n == NULL || !*n) n = program_invocation_short_name;
    size_t k = 0;
    for (; n != NULL && *n && k < sizeof my_name - 1; n++)
        if (name_char(*n)) my_name[k++] = *n;
    if (k == 0) strcpy(my_name, "program");
    const char *d = getenv("FABLE_RUN_DEBUG");
    debug = d != NULL && *d == '1';
}

static void say(const char *fmt, ...) {
    if (!debug) return;
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(line, sizeof line, "fable run [%d]: ", (int)getpid());
    n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

/* ------------------------------------------------------------------------ the daemon's ops */
/* One frame: u32 big-endian length, then a JSON object (fable/_wire.py). */
static int send_frame(int s, const char *json, int fd) {
    uint32_t n = (uint32_t)strlen(json), be = htonl(n);
    char buf[1024];
    if (n + 4 > sizeof buf) return -1;
    memcpy(buf, &be, 4);
    memcpy(buf + 4, json, n);
    struct iovec iov = {buf, n + 4};
    union {
        char room[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&ctl, 0, sizeof ctl);
        m.msg_control = ctl.room;
        m.msg_controllen = sizeof ctl.room;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t w;
    do w = sendmsg(s, &m, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    return w == (ssize_t)(n + 4) ? 0 : -1; /* a short write of a tiny frame: give up */
}

/* Read exactly n bytes (the first read may bring an fd: *fd). */
static int read_full(int s, char *buf, size_t n, int *fd) {
    size_t got = 0;
    while (got < n) {
        union {
            char room[CMSG_SPACE(4 * sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = {buf + got, n - got};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.room,
                           .msg_controllen = sizeof ctl.room};
        ssize_t r = recvmsg(s, &m, MSG_CMSG_CLOEXEC);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k; i++) {
                int f;
                memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
                if (fd != NULL && *fd < 0) *fd = f;
                else close(f);
            }
        }
        got += (size_t)r;
    }
    return 0;
}

static int read_frame(int s, char *body, int *fd) {
    uint32_t be;
    if (read_full(s, (char *)&be, 4, fd) < 0) return -1;
    uint32_t n = ntohl(be);
    if (n >= MAX_REPLY) return -1;
    if (read_full(s, body, n, fd) < 0) return -1;
    body[n] = 0;
    return 0;
}

/* Ask the daemon: op's JSON fields (without braces), `fd` attached (-1: none). 1: the reply
 * says "pair":true and *got is the fd it sent, or "found":true; 0: done, neither; -1: no
 * daemon, or it refused or failed (then nothing changes: plain TCP); -2: paired, but the fd
 * did not arrive (no room in the fd table). errno is kept. */
static int ask(const char *op, const char *fields, int fd, int *got) {
    int saved = errno, rc = -1;
    *got = -1;
    if (!daemon_path[0]) return -1;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) goto out;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, daemon_path);
    struct timeval tv = {CALL_TIMEOUT_S, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (real_connect(s, (struct sockaddr *)&a, sizeof a) < 0) goto out;
    /* a daemon impostor cannot be another user: this user's daemon or root's system one */
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0 ||
        (cred.uid != getuid() && cred.uid != 0))
        goto out;
    char req[768], body[MAX_REPLY];
    snprintf(req, sizeof req, "{\"v\":1,\"id\":2,\"op\":\"%s\",\"name\":\"%s\"%s%s}", op, my_name,
             fields[0] ? "," : "", fields);
    /* two sendmsgs: the fd belongs to the frame whose first byte it came with */
    if (send_frame(s, "{\"v\":1,\"id\":1,\"op\":\"hello\"}", -1) < 0 || send_frame(s, req, fd) < 0)
        goto out;
    if (read_frame(s, body, NULL) < 0 || !strstr(body, "\"ok\":true")) goto out;
    if (read_frame(s, body, got) < 0) goto out;
    if (!strstr(body, "\"ok\":true"))
        say("%s refused: %.200s", op, body);
    else
        rc = strstr(body, "\"pair\":true") ? (*got >= 0 ? 1 : -2) : !!strstr(body, "\"found\":true");
out:
    if (rc != 1 && *got >= 0) {
        close(*got);
        *got = -1;
    }
    if (s >= 0) close(s);
    errno = saved;
    return rc;
}

/* ------------------------------------------------------------------------------- helpers */
static int is_tcp(int fd) {
    int type = 0, proto = 0;
    socklen_t l = sizeof type;
    if (real_getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0 || type != SOCK_STREAM) return 0;
    l = sizeof proto;
    return real_getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &l) == 0 && proto == IPPROTO_TCP;
}

/* 2: a loopback address, 1: a wildcard one, 0: anything else */
static int local_kind(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) {
        uint32_t h = ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr);
        return (h >> 24) == 127 ? 2 : h == 0 ? 1 : 0;
    }
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a)) return 2;
        if (IN6_IS_ADDR_UNSPECIFIED(a)) return 1;
        if (IN6_IS_ADDR_V4MAPPED(a)) return a->s6_addr[12] == 127 ? 2 : 0;
    }
    return 0;
}

static int port_of(const struct sockaddr *sa) {
    return ntohs(sa->sa_family == AF_INET ? ((const struct sockaddr_in *)sa)->sin_port
                                          : ((const struct sockaddr_in6 *)sa)->sin6_port);
}

/* Whether the socket under fd is in an epoll set of this process (or that cannot be known):
 * each epoll fd's /proc/self/fdinfo lists "tfd: FD events: .. data: .. pos:.. ino:INODE". */
static int in_epoll(int fd) {
    ino_t me = inode_of(fd);
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL) return 1;
    int found = 0;
    struct dirent *e;
    char link[64], path[300], line[256];
    while (!found && (e = readdir(d)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        ssize_t n = readlinkat(dirfd(d), e->d_name, link, sizeof link - 1);
        if (n <= 0) continue;
        link[n] = 0;
        if (strcmp(link, "anon_inode:[eventpoll]") != 0) continue;
        snprintf(path, sizeof path, "/proc/self/fdinfo/%s", e->d_name);
        FILE *f = fopen(path, "re");
        if (f == NULL) {
            found = 1;
            break;
        }
        while (!found && fgets(line, sizeof line, f) != NULL) {
            int tfd;
            const char *ino = strstr(line, "ino:");
            if (sscanf(line, "tfd: %d", &tfd) == 1 && tfd == fd && ino != NULL &&
                (ino_t)strtoull(ino + 4, NULL, 16) == me)
                found = 1;
        }
        fclose(f);
    }
    closedir(d);
    return found;
}

/* Put the unix end `u` in place of fd (its O_NONBLOCK and FD_CLOEXEC kept), remembering the
 * TCP addresses fd had (`to`: its peer's, where a connect may still be under way). 0, or -1
 * with nothing changed. */
static int swap_in(int fd, int u, const struct sockaddr *to, socklen_t tolen) {
    struct fdstate *s = slot(fd, 1);
    if (s == NULL) return -1;
    struct sockaddr_in6 local, peer;
    socklen_t ll = sizeof local, pl = sizeof peer;
    int fl = fcntl(fd, F_GETFL), fdfl = fcntl(fd, F_GETFD);
    if (fl < 0 || fdfl < 0 || real_getsockname(fd, (struct sockaddr *)&local, &ll) < 0)
        return -1;
    if (to != NULL) {
        pl = tolen < sizeof peer ? tolen : sizeof peer;
        memcpy(&peer, to, pl);
    } else if (real_getpeername(fd, (struct sockaddr *)&peer, &pl) < 0) {
        return -1;
    }
    if ((fl & O_NONBLOCK) && fcntl(u, F_SETFL, O_NONBLOCK) < 0) return -1;
    if (dup3(u, fd, (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) return -1;
    s->local = local;
    s->peer = peer;
    s->llen = ll;
    s->plen = pl;
    s->nopts = 0;
    s->ino = inode_of(fd);
    s->flags = F_SWAPPED;
    return 0;
}

/* ---------------------------------------------------------------------------- interposed */
int listen(int fd, int backlog) {
    if (real_listen == NULL) resolve();
    int rc = real_listen(fd, backlog);
    if (rc < 0 || !daemon_path[0]) return rc;
    int saved = errno;
    struct sockaddr_in6 a;
    socklen_t l = sizeof a;
    if (is_tcp(fd) && real_getsockname(fd, (struct sockaddr *)&a, &l) == 0 &&
        local_kind((struct sockaddr *)&a) && slot(fd, 1) != NULL) {
        int got;
        if (ask("port_listen", "", fd, &got) >= 0) {
            struct fdstate *s = slot(fd, 1);
            s->flags = F_LISTEN;
            s->ino = inode_of(fd);
            say("listening on port %d: registered", port_of((struct sockaddr *)&a));
        }
    }
    errno = saved;
    return rc;
}

int connect(int fd, const struct sockaddr *to, socklen_t tolen) {
    if (real_connect == NULL) resolve();
    if (holds(fd, F_SWAPPED) != NULL) { /* connected: what TCP says to a second connect */
        errno = EISCONN;
        return -1;
    }
    if (!daemon_path[0] || to == NULL || tolen < sizeof(struct sockaddr_in) ||
        (to->sa_family != AF_INET && to->sa_family != AF_INET6) ||
        (to->sa_family == AF_INET6 && tolen < sizeof(struct sockaddr_in6)) || !local_kind(to) ||
        !is_tcp(fd))
        return real_connect(fd, to, tolen);
    int saved = errno;
    if (in_epoll(fd)) {
        say("connect to port %d: the fd is in an epoll set, it stays TCP", port_of(to));
        return real_connect(fd, to, tolen);
    }
    char host[INET6_ADDRSTRLEN], fields[128];
    const void *addr = to->sa_family == AF_INET
                           ? (const void *)&((const struct sockaddr_in *)to)->sin_addr
                           : (const void *)&((const struct sockaddr_in6 *)to)->sin6_addr;
    inet_ntop(to->sa_family, addr, host, sizeof host);
    snprintf(fields, sizeof fields, "\"host\":\"%s\",\"port\":%d", host, port_of(to));
    int u;
    if (slot(fd, 1) == NULL) return real_connect(fd, to, tolen); /* (no state: never swapped) */
    int paired = ask("port_connect", fields, fd, &u);
    if (paired == -2) { /* the pair is made and its end lost: connecting would strand the peer
                         * (the daemon drops a pair whose socket never connects) */
        errno = EMFILE;
        return -1;
    }
    errno = saved;
    int rc = real_connect(fd, to, tolen);
    if (paired != 1) return rc;
    int err = errno;
    /* Connected, or connecting (non-blocking; a blocking one a signal interrupted): the pair
     * is the daemon's from now on, so the fd must take its end whatever the TCP connect's
     * timing (if that connect fails later, the daemon closes the other end: the program
     * reads EOF). Any other error: the connect failed here, as it would without fable. */
    if (rc == 0 || err == EINPROGRESS || err == EINTR) {
        if (swap_in(fd, u, to, tolen) == 0)
            say("connect to port %d: carried by a unix socket", port_of(to));
        else
            say("connect to port %d: could not swap (%s)", port_of(to), strerror(errno));
    } else {
        say("connect to port %d: %s, as over TCP", port_of(to), strerror(err));
    }
    close(u);
    errno = err;
    return rc;
}

static int accepted(int lfd, int fd) {
    if (fd < 0 || holds(lfd, F_LISTEN) == NULL) return fd;
    int saved = errno;
    struct sockaddr_in6 peer;
    socklen_t pl = sizeof peer;
    if (real_getpeername(fd, (struct sockaddr *)&peer, &pl) == 0 &&
        local_kind((struct sockaddr *)&peer) == 2) {
        int u;
        if (ask("port_accept", "", fd, &u) == 1) {
            if (swap_in(fd, u, NULL, 0) == 0) say("accepted a connection: carried by a unix socket");
            close(u);
        }
    }
    errno = saved;
    return fd;
}

int accept(int lfd, struct sockaddr *addr, socklen_t *len) {
    if (real_accept == NULL) resolve();
    return accepted(lfd, real_accept(lfd, addr, len));
}

int accept4(int lfd, struct sockaddr *addr, socklen_t *len, int flags) {
    if (real_accept4 == NULL) resolve();
    return accepted(lfd, real_accept4(lfd, addr, len, flags));
}

static int answer_addr(const struct sockaddr_in6 *a, socklen_t al, struct sockaddr *out,
                       socklen_t *len) {
    if (out == NULL || len == NULL) {
        errno = EFAULT;
        return -1;
    }
    memcpy(out, a, *len < al ? *len : al);
    *len = al;
    return 0;
}

int getsockname(int fd, struct sockaddr *addr, socklen_t *len) {
    if (real_getsockname == NULL) resolve();
    struct fdstate *s = holds(fd, F_SWAPPED);
    return s ? answer_addr(&s->local, s->llen, addr, len) : real_getsockname(fd, addr, len);
}

int getpeername(int fd, struct sockaddr *addr, socklen_t *len) {
    if (real_getpeername == NULL) resolve();
    struct fdstate *s = holds(fd, F_SWAPPED);
    return s ? answer_addr(&s->peer, s->plen, addr, len) : real_getpeername(fd, addr, len);
}

static int ip_level(int level) {
    return level == IPPROTO_TCP || level == IPPROTO_IP || level == IPPROTO_IPV6;
}

int setsockopt(int fd, int level, int name, const void *val, socklen_t len) {
    if (real_setsockopt == NULL) resolve();
    struct fdstate *s = ip_level(level) ? holds(fd, F_SWAPPED) : NULL;
    if (s == NULL) return real_setsockopt(fd, level, name, val, len);
    int v = 0;
    if (val != NULL && len >= sizeof(int)) memcpy(&v, val, sizeof v);
    int i = 0;
    while (i < s->nopts && !(s->opt_level[i] == level && s->opt_name[i] == name)) i++;
    if (i < NOPTS) { /* past NOPTS options: accepted, not remembered */
        s->opt_level[i] = level;
        s->opt_name[i] = name;
        s->opt_val[i] = v;
        if (i == s->nopts) s->nopts++;
    }
    return 0;
}

int getsockopt(int fd, int level, int name, void *val, socklen_t *len) {
    if (real_getsockopt == NULL) resolve();
    int sol = level == SOL_SOCKET && (name == SO_DOMAIN || name == SO_PROTOCOL);
    struct fdstate *s = ip_level(level) || sol ? holds(fd, F_SWAPPED) : NULL;
    if (s == NULL) return real_getsockopt(fd, level, name, val, len);
    if (val == NULL || len == NULL) {
        errno = EFAULT;
        return -1;
    }
    if (level == IPPROTO_TCP && name == TCP_INFO) { /* an established connection, no counters */
        struct tcp_info ti;
        memset(&ti, 0, sizeof ti);
        ti.tcpi_state = TCP_ESTABLISHED;
        if (*len > sizeof ti) *len = sizeof ti;
        memcpy(val, &ti, *len);
        return 0;
    }
    int v = sol ? (name == SO_DOMAIN ? s->local.sin6_family : IPPROTO_TCP) : 0;
    for (int i = 0; !sol && i < s->nopts; i++)
        if (s->opt_level[i] == level && s->opt_name[i] == name) v = s->opt_val[i];
    if (*len > sizeof v) *len = sizeof v;
    memcpy(val, &v, *len);
    return 0;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    if (real_getaddrinfo == NULL) resolve();
    size_t n = node != NULL ? strlen(node) : 0;
    if (n <= 6 || strcasecmp(node + n - 6, ".fable") != 0)
        return real_getaddrinfo(node, service, hints, res);
    char name[65], fields[96];
    size_t k = n - 6;
    if (k >= sizeof name) return EAI_NONAME;
    for (size_t i = 0; i < k; i++) {
        if (!name_char(node[i])) return EAI_NONAME;
        name[i] = node[i];
    }
    name[k] = 0;
    snprintf(fields, sizeof fields, "\"lookup\":\"%s\"", name);
    int unused;
    if (ask("port_resolve", fields, -1, &unused) != 1) {
        say("%s: no fable-run program of that name listens", node);
        return EAI_NONAME;
    }
    struct addrinfo h;
    memset(&h, 0, sizeof h);
    if (hints != NULL) h = *hints;
    h.ai_flags |= AI_NUMERICHOST;
    say("%s: a fable-run program on this host", node);
    return real_getaddrinfo(h.ai_family == AF_INET6 ? "::1" : "127.0.0.1", service, &h, res);
}
