/*
 * overlay: the CNI plugin executable, a thin static client of overlayd.
 *
 * It reads the CNI_* environment and the config on stdin, opens CNI_NETNS
 * and hands all three to the node agent over a unix socket (the namespace
 * as a file descriptor, SCM_RIGHTS, so the agent needs no access to the
 * runtime's mount namespace). The agent does the work and returns the exact
 * stdout and exit code. No libc beyond the static one linked in, no files
 * read but stdin: it runs on a host with no Python and whatever libc.
 *
 * Wire format (overlay/cni/wire.py; overlay/agent/cniserver.py is the other
 * end; lengths are big-endian u32):
 *   request : "OVLCNI1\0" | len | NUL-separated KEY=VALUE env | len | stdin
 *             (+ the netns fd as SCM_RIGHTS on the first send)
 *   response: u32 exit code | len | stdout bytes
 *
 * Without the agent: VERSION is always answered here. When the agent cannot
 * be reached, DEL and GC are recorded durably, as the very request bytes,
 * in <dir of the socket>/cni-pending/ and answered 0: overlayd replays every
 * record when it starts and before it serves any later CNI request, so the
 * address and the veth are released before anything could reuse them.
 * STATUS answers 50, ADD and CHECK 11 ("try again later"). Every error is a
 * CNI error document on stdout with a non-zero exit code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "OVLCNI1" /* and its NUL: 8 bytes */
#define DEFAULT_SOCKET "/run/overlay/cni.sock"
#define PENDING_DIR "cni-pending"
#define MAX_CONFIG (1 << 20) /* as overlay.cni.spec.MAX_CONFIG_BYTES */
#define MAX_RESPONSE (64u << 20)
#define TIMEOUT_S 120
#define MAX_DEPTH 512
#define E_INCOMPATIBLE 1
#define E_INVALID_ENV 4
#define E_IO 5
#define E_DECODE 6
#define E_INVALID_CONFIG 7
#define E_TRY_AGAIN 11
#define E_NOT_AVAILABLE 50
#define E_INTERNAL 100

typedef const unsigned char *cp;
static const char *const VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
static const char *const COMMANDS[] = {"ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"};
static const char *const ENV_KEYS[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                       "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

typedef struct {
	char *p;
	size_t n, cap;
} buf;

static char err_version[8] = "1.0.0"; /* the version errors are written in */

static int write_all(int fd, const void *data, size_t n)
{
	const char *p = data;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w, n -= (size_t)w;
	}
	return 0;
}

static void put(buf *b, const void *s, size_t n)
{
	if (b->n + n + 1 > b->cap) {
		size_t cap = (b->n + n + 1) * 2;
		char *p = realloc(b->p, cap);
		if (!p) {
			static const char oom[] = "{\"cniVersion\": \"1.0.0\", \"code\": 100, "
			                          "\"msg\": \"overlay CNI plugin: out of memory\"}\n";
			write_all(1, oom, sizeof oom - 1);
			_exit(E_INTERNAL);
		}
		b->p = p, b->cap = cap;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
	b->p[b->n] = 0;
}

static void puts_(buf *b, const char *s) { put(b, s, strlen(s)); }

static void put_u32(buf *b, uint32_t v)
{
	unsigned char x[4] = {v >> 24, v >> 16, v >> 8, v};
	put(b, x, 4);
}

/* --- JSON: a validating scanner, and the few top-level keys we read ---------------------- */

/* Length of the valid UTF-8 sequence at p (what Python's strict decoder accepts), or 0. */
static int utf8_len(cp p, cp e)
{
	unsigned c = p[0], v, min;
	int n;
	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		n = 2, min = 0x80;
	else if ((c & 0xF0) == 0xE0)
		n = 3, min = 0x800;
	else if (c >= 0xF0 && c <= 0xF4)
		n = 4, min = 0x10000;
	else
		return 0;
	if (e - p < n)
		return 0;
	v = c & (0x3Fu >> (n - 1));
	for (int i = 1; i < n; i++) {
		if ((p[i] & 0xC0) != 0x80)
			return 0;
		v = v << 6 | (p[i] & 0x3F);
	}
	return v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF) ? 0 : n;
}

static int hex4(cp p, cp e)
{
	int v = 0;
	if (e - p < 4)
		return -1;
	for (int i = 0; i < 4; i++) {
		int c = p[i] | 0x20;
		int d = p[i] >= '0' && p[i] <= '9' ? p[i] - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
		if (d < 0)
			return -1;
		v = v * 16 + d;
	}
	return v;
}

static cp ws(cp p, cp e)
{
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

static cp string_end(cp p, cp e) /* p at the opening quote */
{
	for (p++; p < e;) {
		if (*p == '"')
			return p + 1;
		if (*p < 0x20)
			return NULL;
		if (*p == '\\') {
			if (++p >= e)
				return NULL;
			if (*p == 'u') {
				if (hex4(p + 1, e) < 0)
					return NULL;
				p += 5;
			} else if (*p && strchr("\"\\/bfnrt", *p)) {
				p++;
			} else {
				return NULL;
			}
			continue;
		}
		int n = utf8_len(p, e);
		if (!n)
			return NULL;
		p += n;
	}
	return NULL;
}

static cp digits(cp p, cp e)
{
	cp s = p;
	while (p < e && *p >= '0' && *p <= '9')
		p++;
	return p > s ? p : NULL;
}

static cp word(cp p, cp e, const char *w)
{
	size_t n = strlen(w);
	return (size_t)(e - p) >= n && !memcmp(p, w, n) ? p + n : NULL;
}

static cp value_end(cp p, cp e, int depth)
{
	if (p >= e)
		return NULL;
	if (*p == '"')
		return string_end(p, e);
	if (*p == '{' || *p == '[') {
		int obj = *p == '{';
		unsigned char close = obj ? '}' : ']';
		if (depth >= MAX_DEPTH)
			return NULL;
		p = ws(p + 1, e);
		if (p < e && *p == close)
			return p + 1;
		for (;;) {
			if (obj) {
				if (p >= e || *p != '"' || !(p = string_end(p, e)))
					return NULL;
				p = ws(p, e);
				if (p >= e || *p != ':')
					return NULL;
				p = ws(p + 1, e);
			}
			if (!(p = value_end(p, e, depth + 1)))
				return NULL;
			p = ws(p, e);
			if (p >= e)
				return NULL;
			if (*p == close)
				return p + 1;
			if (*p != ',')
				return NULL;
			p = ws(p + 1, e);
		}
	}
	cp q;
	/* Python's json (the agent's parser) also takes NaN, Infinity and -Infinity. */
	if ((q = word(p, e, "true")) || (q = word(p, e, "false")) || (q = word(p, e, "null")) ||
	    (q = word(p, e, "NaN")) || (q = word(p, e, "Infinity")) || (q = word(p, e, "-Infinity")))
		return q;
	if (*p == '-')
		p++;
	if (p < e && *p == '0')
		p++;
	else if (!(p = digits(p, e)))
		return NULL;
	if (p < e && *p == '.' && !(p = digits(p + 1, e)))
		return NULL;
	if (p < e && (*p == 'e' || *p == 'E')) {
		p++;
		if (p < e && (*p == '+' || *p == '-'))
			p++;
		if (!(p = digits(p, e)))
			return NULL;
	}
	return p;
}

/* Decode the JSON string token [s, e) (quotes included) as UTF-8 into out, NUL-terminated.
 * -1 if it does not fit, holds a NUL or a lone surrogate (never a valid key or path). */
static long unescape(cp s, cp e, char *out, size_t cap)
{
	size_t n = 0;
	for (s++, e--; s < e;) {
		unsigned long c = *s++;
		if (c == '\\') {
			c = *s++;
			if (c == 'u') {
				long hi = hex4(s, e), lo;
				s += 4;
				c = (unsigned long)hi;
				if (hi >= 0xDC00 && hi <= 0xDFFF)
					return -1;
				if (hi >= 0xD800 && hi <= 0xDBFF) {
					if (e - s < 6 || s[0] != '\\' || s[1] != 'u')
						return -1;
					lo = hex4(s + 2, e);
					if (lo < 0xDC00 || lo > 0xDFFF)
						return -1;
					c = 0x10000 + ((unsigned long)(hi - 0xD800) << 10) +
					    (unsigned long)(lo - 0xDC00);
					s += 6;
				}
			} else {
				c = c == 'b' ? 8 : c == 'f' ? 12 : c == 'n' ? 10 : c == 'r' ? 13 :
				    c == 't' ? 9 : c;
			}
			if (c == 0 || n + 4 >= cap)
				return -1;
			if (c < 0x80) {
				out[n++] = (char)c;
			} else if (c < 0x800) {
				out[n++] = (char)(0xC0 | c >> 6);
				out[n++] = (char)(0x80 | (c & 0x3F));
			} else if (c < 0x10000) {
				out[n++] = (char)(0xE0 | c >> 12);
				out[n++] = (char)(0x80 | (c >> 6 & 0x3F));
				out[n++] = (char)(0x80 | (c & 0x3F));
			} else {
				out[n++] = (char)(0xF0 | c >> 18);
				out[n++] = (char)(0x80 | (c >> 12 & 0x3F));
				out[n++] = (char)(0x80 | (c >> 6 & 0x3F));
				out[n++] = (char)(0x80 | (c & 0x3F));
			}
			continue;
		}
		if (n + 1 >= cap)
			return -1;
		out[n++] = (char)c;
	}
	out[n] = 0;
	return (long)n;
}

/* The value of member `key` of the (validated) object at p, or NULL; the last one wins,
 * as in Python. *vend is set to the end of the value. */
static cp member(cp p, cp e, const char *key, cp *vend)
{
	cp found = NULL;
	char k[64];
	p = ws(p + 1, e);
	while (p < e && *p == '"') {
		cp kend = string_end(p, e);
		long n = unescape(p, kend, k, sizeof k);
		cp v = ws(ws(kend, e) + 1, e), ve = value_end(v, e, 1);
		if (n >= 0 && !strcmp(k, key))
			found = v, *vend = ve;
		p = ws(ve, e);
		if (p < e && *p == ',')
			p = ws(p + 1, e);
	}
	return found;
}

/* A member that is a string, decoded into out: its length, -1 if absent or not a string,
 * -2 if it cannot be decoded into out. */
static long string_member(cp obj, cp e, const char *key, char *out, size_t cap)
{
	cp ve, v = obj ? member(obj, e, key, &ve) : NULL;
	if (!v || *v != '"')
		return -1;
	long n = unescape(v, ve, out, cap);
	return n < 0 ? -2 : n;
}

/* --- output ---------------------------------------------------------------------------- */

static void put_jstr(buf *b, const char *s)
{
	cp p = (cp)s, e = p + strlen(s);
	puts_(b, "\"");
	while (p < e) {
		char esc[8];
		int n;
		if (*p == '"' || *p == '\\') {
			esc[0] = '\\', esc[1] = (char)*p++;
			put(b, esc, 2);
		} else if (*p < 0x20 || *p == 0x7F) {
			snprintf(esc, sizeof esc, "\\u%04x", *p++);
			put(b, esc, 6);
		} else if ((n = utf8_len(p, e))) {
			put(b, p, (size_t)n);
			p += n;
		} else {
			puts_(b, "\\ufffd"); /* not UTF-8 (an env value): still a valid document */
			p++;
		}
	}
	puts_(b, "\"");
}

static int fail(int code, const char *details, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(int code, const char *details, const char *fmt, ...)
{
	char msg[4096], num[16];
	va_list ap;
	buf b = {0};
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	snprintf(num, sizeof num, "%d", code);
	puts_(&b, "{\"cniVersion\": \"");
	puts_(&b, err_version);
	puts_(&b, "\", \"code\": ");
	puts_(&b, num);
	puts_(&b, ", \"msg\": ");
	put_jstr(&b, msg);
	if (details && *details) {
		puts_(&b, ", \"details\": ");
		put_jstr(&b, details);
	}
	puts_(&b, "}\n");
	write_all(1, b.p, b.n);
	return code;
}

/* --- the environment, checked as overlay.cni.spec.parse_env does ------------------------- */

static int one_of(const char *s, const char *const *list, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!strcmp(s, list[i]))
			return 1;
	return 0;
}

/* Printable, no whitespace, valid UTF-8 (the agent is stricter about non-ASCII). */
static int plain(const char *s, const char *also_bad)
{
	cp p = (cp)s, e = p + strlen(s);
	while (p < e) {
		int n = utf8_len(p, e);
		if (!n || *p <= ' ' || *p == 0x7F || strchr(also_bad, *p) ||
		    (n == 2 && p[0] == 0xC2 && p[1] <= 0xA0)) /* C1 controls, NBSP */
			return 0;
		p += n;
	}
	return 1;
}

static size_t chars(const char *s)
{
	size_t n = 0;
	for (; *s; s++)
		n += ((unsigned char)*s & 0xC0) != 0x80;
	return n;
}

static int check_env(const char *cmd)
{
	static const char *const need[] = {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"};
	const char *cid = getenv("CNI_CONTAINERID"), *ifname = getenv("CNI_IFNAME");
	const char *args = getenv("CNI_ARGS");
	if (!cmd || !*cmd)
		return fail(E_INVALID_ENV, NULL, "CNI_COMMAND is not set");
	if (!one_of(cmd, COMMANDS, COUNT(COMMANDS)))
		return fail(E_INVALID_ENV, NULL, "CNI_COMMAND '%.64s' is not one of ADD, DEL, CHECK, "
		            "VERSION, GC, STATUS", cmd);
	int adding = !strcmp(cmd, "ADD") || !strcmp(cmd, "CHECK");
	if (adding || !strcmp(cmd, "DEL"))
		for (size_t i = 0; i < COUNT(need); i++) {
			const char *v = getenv(need[i]);
			if ((adding || i != 1) && (!v || !*v))
				return fail(E_INVALID_ENV, NULL, "%s is required for %s but not set",
				            need[i], cmd);
		}
	if (cid && *cid && (strlen(cid) > 1024 || !plain(cid, "/")))
		return fail(E_INVALID_ENV, NULL, "CNI_CONTAINERID must be printable, without "
		            "whitespace or '/', at most 1024 characters");
	if (ifname && *ifname) {
		if (chars(ifname) > 15)
			return fail(E_INVALID_ENV, NULL, "CNI_IFNAME '%.64s' is longer than 15 "
			            "characters", ifname);
		if (!strcmp(ifname, ".") || !strcmp(ifname, ".."))
			return fail(E_INVALID_ENV, NULL, "CNI_IFNAME '%s' is not a valid interface "
			            "name", ifname);
		if (!plain(ifname, "/:"))
			return fail(E_INVALID_ENV, NULL, "CNI_IFNAME '%s' contains '/', ':', whitespace "
			            "or control characters", ifname);
	}
	for (const char *item = args; item && *item;) {
		const char *end = strchr(item, ';'), *eq = strchr(item, '=');
		size_t n = end ? (size_t)(end - item) : strlen(item);
		if (n && (!eq || eq >= item + n || eq == item))
			return fail(E_INVALID_ENV, NULL, "CNI_ARGS: '%.*s' is not KEY=VALUE",
			            (int)(n > 200 ? 200 : n), item);
		item += n + (end != NULL);
	}
	return 0;
}

/* --- talking to the agent ---------------------------------------------------------------- */

static int send_all(int s, const char *p, size_t n, int fd)
{
	char ctl[CMSG_SPACE(sizeof(int))];
	while (n) {
		struct iovec iov = {(void *)p, n};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
		if (fd >= 0) { /* the namespace goes with the first bytes */
			memset(ctl, 0, sizeof ctl);
			m.msg_control = ctl, m.msg_controllen = sizeof ctl;
			struct cmsghdr *c = CMSG_FIRSTHDR(&m);
			c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &fd, sizeof fd);
		}
		ssize_t w = sendmsg(s, &m, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return errno;
		p += w, n -= (size_t)w, fd = -1;
	}
	return 0;
}

/* 0, an errno, or -1: the agent closed the connection early. */
static int recv_all(int s, char *p, size_t n)
{
	while (n) {
		ssize_t r = recv(s, p, n, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return errno;
		if (r == 0)
			return -1;
		p += r, n -= (size_t)r;
	}
	return 0;
}

static uint32_t be32(const unsigned char *x)
{
	return (uint32_t)x[0] << 24 | (uint32_t)x[1] << 16 | (uint32_t)x[2] << 8 | x[3];
}

static void request(buf *b, const buf *head, const buf *in)
{
	put(b, MAGIC, sizeof MAGIC);
	put_u32(b, (uint32_t)head->n);
	put(b, head->p ? head->p : "", head->n);
	put_u32(b, (uint32_t)in->n);
	put(b, in->p ? in->p : "", in->n);
}

static int call_agent(const char *path, const buf *req, int nsfd, uint32_t *code, buf *out)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct timeval tv = {TIMEOUT_S, 0};
	unsigned char head[8];
	int s, err;
	if (strlen(path) >= sizeof sa.sun_path)
		return ENAMETOOLONG;
	memcpy(sa.sun_path, path, strlen(path));
	if ((s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		return errno;
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0)
		err = errno;
	else if (!(err = send_all(s, req->p, req->n, nsfd)) &&
	         !(err = recv_all(s, (char *)head, 8))) {
		uint32_t n = be32(head + 4);
		*code = be32(head);
		if (n > MAX_RESPONSE)
			err = EPROTO;
		else if ((out->p = malloc(n + 1u)) == NULL)
			err = ENOMEM;
		else
			out->n = n, err = recv_all(s, out->p, n);
	}
	close(s);
	return err;
}

/* --- without the agent --------------------------------------------------------------------- */

/* DEL and GC, kept for overlayd to replay (see the top of this file). */
static int record(const char *sock, const buf *req, const char *reason)
{
	char dir[4200], tmp[4300], name[4300];
	struct timespec ts;
	struct stat st;
	int fd, err = 0;
	char *slash = strrchr(strcpy(dir, sock), '/');
	if (!slash)
		strcpy(dir, ".");
	else
		slash[slash == dir] = 0; /* "/x.sock" -> "/" */
	if (stat(dir, &st) < 0 && errno == ENOENT)
		return 0; /* no overlayd ever ran with this socket: it allocated nothing */
	snprintf(dir + strlen(dir), sizeof dir - strlen(dir), "/%s", PENDING_DIR);
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(tmp, sizeof tmp, "%s/.%d.tmp", dir, (int)getpid());
	snprintf(name, sizeof name, "%s/%010lld%09ld-%d.req", dir, (long long)ts.tv_sec,
	         ts.tv_nsec, (int)getpid());
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		err = errno;
	else if ((fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0)
		err = errno;
	else {
		if (write_all(fd, req->p, req->n) < 0 || fsync(fd) < 0)
			err = errno ? errno : EIO;
		close(fd);
		if (!err && rename(tmp, name) < 0)
			err = errno;
		if (err)
			unlink(tmp);
		else if ((fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
			fsync(fd);
			close(fd);
		}
	}
	if (err) {
		char details[8192 + sizeof dir + 64]; /* reason, dir, strerror */
		snprintf(details, sizeof details, "%s; recording it in %s: %s", reason, dir,
		         strerror(err));
		return fail(E_IO, details, "cannot reach the overlay node agent, nor record the "
		            "request for it");
	}
	return 0;
}

static int version_at_least(const char *v, const char *min) { return strcmp(v, min) >= 0; }

static int offline(const char *cmd, cp doc, cp e, int decoded, const char *sock,
                   const buf *req, const char *reason)
{
	char v[16];
	long n;
	int rc = check_env(cmd);
	if (rc)
		return rc;
	if (!decoded)
		return fail(E_DECODE, NULL, "failed to decode the network config on stdin");
	if (*doc != '{')
		return fail(E_DECODE, NULL, "the network config must be a JSON object");
	if ((n = string_member(doc, e, "cniVersion", v, sizeof v)) == -1) {
		cp ve;
		return fail(E_INVALID_CONFIG, NULL, member(doc, e, "cniVersion", &ve) ?
		            "cniVersion: expected a string" : "cniVersion: missing");
	}
	if (n < 0 || !one_of(v, VERSIONS, COUNT(VERSIONS))) {
		char details[128];
		snprintf(details, sizeof details, "config is '%s', plugin supports 0.3.0, 0.3.1, "
		         "0.4.0, 1.0.0, 1.1.0", n < 0 ? "?" : v);
		return fail(E_INCOMPATIBLE, details, "incompatible CNI versions");
	}
	if (!strcmp(cmd, "CHECK") && !version_at_least(v, "0.4.0"))
		return fail(E_INCOMPATIBLE, NULL, "CHECK needs cniVersion 0.4.0 or later");
	if ((!strcmp(cmd, "GC") || !strcmp(cmd, "STATUS")) && !version_at_least(v, "1.1.0"))
		return fail(E_INCOMPATIBLE, NULL, "%s needs cniVersion 1.1.0", cmd);
	if (!strcmp(cmd, "STATUS"))
		return fail(E_NOT_AVAILABLE, reason, "the overlay node agent is not available");
	if (!strcmp(cmd, "ADD") || !strcmp(cmd, "CHECK"))
		return fail(E_TRY_AGAIN, reason, "the overlay node agent is not running yet; try "
		            "again later");
	if (!strcmp(cmd, "GC")) {
		cp ve, a = member(doc, e, "cni.dev/valid-attachments", &ve);
		if (a && *a != '[')
			return fail(E_INVALID_CONFIG, NULL, "cni.dev/valid-attachments: expected a list");
		for (cp p = a ? ws(a + 1, e) : e; p < e && *p != ']';) {
			char s[8];
			if (*p != '{' || string_member(p, e, "containerID", s, 1) == -1 ||
			    string_member(p, e, "ifname", s, 1) == -1)
				return fail(E_INVALID_CONFIG, NULL, "cni.dev/valid-attachments: each item "
				            "needs string containerID and ifname");
			p = ws(value_end(p, e, 1), e);
			if (p < e && *p == ',')
				p = ws(p + 1, e);
		}
	}
	return record(sock, req, reason);
}

/* --- main ------------------------------------------------------------------------------------ */

int main(void)
{
	static char sock[4096];
	buf in = {0}, req = {0}, out = {0};
	const char *cmd = getenv("CNI_COMMAND");
	char chunk[65536], reason[8192], v[16];
	int nsfd = -1, too_big = 0;
	uint32_t code = 0;

	signal(SIGPIPE, SIG_IGN);
	for (;;) {
		ssize_t r = read(0, chunk, sizeof chunk);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		if (in.n + (size_t)r > MAX_CONFIG) {
			too_big = 1;
			break;
		}
		put(&in, chunk, (size_t)r);
	}
	cp s = (cp)(in.p ? in.p : ""), e = s + in.n, doc = ws(s, e);
	cp end = value_end(doc, e, 0);
	int decoded = !too_big && end && ws(end, e) == e;
	cp obj = decoded && *doc == '{' ? doc : NULL;
	long vn = string_member(obj, e, "cniVersion", v, sizeof v);
	if (vn > 0 && one_of(v, VERSIONS, COUNT(VERSIONS)))
		memcpy(err_version, v, (size_t)vn + 1);

	if (cmd && !strcmp(cmd, "VERSION")) {
		cp ve, rv = obj ? member(obj, e, "cniVersion", &ve) : NULL;
		buf b = {0};
		puts_(&b, "{\"cniVersion\": ");
		if (rv && *rv == '"' && ve - rv > 2)
			put(&b, rv, (size_t)(ve - rv)); /* the requested one, as it was written */
		else
			puts_(&b, "\"1.0.0\"");
		puts_(&b, ", \"supportedVersions\": [");
		for (size_t i = 0; i < COUNT(VERSIONS); i++) {
			puts_(&b, i ? ", \"" : "\"");
			puts_(&b, VERSIONS[i]);
			puts_(&b, "\"");
		}
		puts_(&b, "]}\n");
		return write_all(1, b.p, b.n) ? E_IO : 0;
	}
	if (too_big)
		return fail(E_DECODE, NULL, "network config is larger than %d bytes", MAX_CONFIG);

	cp ve;
	long sn = string_member(obj, e, "agentSocket", sock, sizeof sock);
	if (sn == -1 && obj && member(obj, e, "agentSocket", &ve))
		return fail(E_INVALID_CONFIG, NULL, "agentSocket: expected a path");
	if (sn == -2)
		return fail(E_INVALID_CONFIG, NULL, "agentSocket: not a usable path (too long, or a "
		            "NUL or a lone surrogate in it)");
	if (sn <= 0)
		strcpy(sock, DEFAULT_SOCKET);

	/* The request, as the agent reads it: the CNI_* variables that are set. */
	buf head = {0}, record_req = {0};
	for (size_t i = 0; i < COUNT(ENV_KEYS); i++) {
		const char *val = getenv(ENV_KEYS[i]);
		if (!val)
			continue;
		if (head.n)
			put(&head, "", 1); /* the NUL separator */
		puts_(&head, ENV_KEYS[i]);
		puts_(&head, "=");
		puts_(&head, val);
	}
	/* A record for the agent (DEL, GC) goes without NETNS_ERROR: it is replayed without
	 * the namespace anyway. */
	request(&record_req, &head, &in);
	const char *netns = getenv("CNI_NETNS");
	if (netns && *netns && (nsfd = open(netns, O_RDONLY | O_CLOEXEC)) < 0) {
		char extra[256];
		int en = errno;
		snprintf(extra, sizeof extra, "NETNS_ERROR=%s (errno %d)", strerror(en), en);
		if (head.n)
			put(&head, "", 1);
		puts_(&head, extra);
	}
	request(&req, &head, &in);
	int err = call_agent(sock, &req, nsfd, &code, &out);
	if (!err) {
		if (write_all(1, out.p, out.n) < 0)
			return E_IO;
		return code <= 255 ? (int)code : 1;
	}
	if (err < 0)
		snprintf(reason, sizeof reason, "cannot reach the overlay node agent at %s: the "
		         "agent closed the connection", sock);
	else
		snprintf(reason, sizeof reason, "cannot reach the overlay node agent at %s: "
		         "[Errno %d] %s", sock, err, strerror(err));
	return offline(cmd, doc, e, decoded, sock, &record_req, reason);
}
