// A real OpenID provider for the sign-in tests: oidc-provider (OpenID Certified), configured by
// the JSON in argv[2]: {issuer, port, people: {login: {email, name, groups}}, clients: [...],
// ttl: {IdToken: s, AccessToken: s, ...}}. Its development login form takes any login name of
// `people` (any password). It prints "ready" once it listens.
import Provider from 'oidc-provider';

const config = JSON.parse(process.argv[2]);
const provider = new Provider(config.issuer, {
  clients: config.clients,
  findAccount: async (ctx, id) => config.people[id] && {
    accountId: id,
    claims: async () => ({ sub: id, email_verified: true, ...config.people[id] }),
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
  scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
  // Claims of the scopes granted go into the ID token too (as Keycloak and Entra ID put them).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true }, revocation: { enabled: true } },
  pkce: { required: () => true },
  ttl: config.ttl || {},
  // A refresh token whenever the client may have one, without the offline_access dance.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
});
provider.listen(config.port, '127.0.0.1', () => console.log('ready'));
