// SPDX-License-Identifier: GPL-2.0
// The vsock client of shared/seeds/002 ("vsock notes"), as written there
// apart from its CID and port, which the build passes as SEED_CID and
// SEED_PORT (tools/build-scenarios.sh; default: the seed's own).
#ifndef SEED_CID
#define SEED_CID VMADDR_CID_HOST
#endif
#ifndef SEED_PORT
#define SEED_PORT 9999
#endif

#include <sys/socket.h>
#include <linux/vm_sockets.h>
#include <string.h>

int main()
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);

	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof(struct sockaddr_vm));
	addr.svm_family = AF_VSOCK;
	addr.svm_port = SEED_PORT;
	addr.svm_cid = SEED_CID;

	connect(s, &addr, sizeof(struct sockaddr_vm));

	send(s, "Hello, world!", 13, 0);

	close(s);

	return 0;
}
