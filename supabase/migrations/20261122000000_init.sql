-- Initial schema for the WhatsApp bot's Supabase store.
--
-- Idempotent on purpose: applying this file again changes nothing and raises nothing, so it can be pasted into
-- the Supabase SQL editor or re-run by `supabase db push` / the test stack without harm.
--
-- Column names are a contract: the SQLite store (memory/) mirrors them exactly.
-- The bot talks to these tables only with the service_role key, which bypasses row level security; RLS is on
-- and anon/authenticated hold no privileges, so a leaked anon key reads nothing (phone numbers, message text).

create table if not exists public.chats (
    chat_id text primary key,
    first_seen_at timestamptz not null default now(),
    last_message_at timestamptz
);

-- No foreign key to chats: the local journal replays writes in batches, in any order, after an outage.
create table if not exists public.chat_history (
    id bigint generated always as identity primary key,
    wa_message_id text not null unique,
    chat_id text not null,
    direction text not null check (direction in ('in', 'out')),
    kind text not null default 'text',
    body text not null default '',
    status text not null check (status in ('received', 'answered', 'skipped', 'failed', 'sent')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.bot_flows (
    id bigint generated always as identity primary key,
    keywords text[] not null,
    answer text not null,
    enabled boolean not null default true,
    priority int not null default 0,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.wa_sessions (
    session_id text primary key,
    data bytea not null,
    updated_at timestamptz not null default now()
);

-- Indexes for the queries the bot makes.
-- The last N messages of one chat (the five-message history): chat_id = ? order by created_at desc limit N.
create index if not exists chat_history_chat_id_created_at_idx
    on public.chat_history (chat_id, created_at desc);
-- Unanswered inbound messages since a time (answered after a restart): status = 'received' and direction = 'in'
-- and created_at >= ?. Not a partial index: PostgREST may send the filter values as parameters, which a partial
-- index predicate cannot be proven from.
create index if not exists chat_history_status_direction_created_at_idx
    on public.chat_history (status, direction, created_at);
-- Recent message ids since a time (dedup warm-up, an index-only scan) and the retention delete by created_at.
create index if not exists chat_history_created_at_idx
    on public.chat_history (created_at) include (wa_message_id);

-- updated_at follows every update that does not set it itself (a PATCH of status only, for instance);
-- an explicit value, such as a replayed journal write, is kept.
create or replace function public.touch_updated_at()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    if new.updated_at is not distinct from old.updated_at then
        new.updated_at := now();
    end if;
    return new;
end;
$$;

create or replace trigger chat_history_touch_updated_at
    before update on public.chat_history
    for each row execute function public.touch_updated_at();
create or replace trigger bot_flows_touch_updated_at
    before update on public.bot_flows
    for each row execute function public.touch_updated_at();
create or replace trigger wa_sessions_touch_updated_at
    before update on public.wa_sessions
    for each row execute function public.touch_updated_at();

-- Row level security on all four tables; only service_role gets a policy (and it bypasses RLS anyway), so
-- anon and authenticated see nothing even if someone grants them table privileges later.
alter table public.chats enable row level security;
alter table public.chat_history enable row level security;
alter table public.bot_flows enable row level security;
alter table public.wa_sessions enable row level security;

do $$
declare
    t text;
begin
    foreach t in array array['chats', 'chat_history', 'bot_flows', 'wa_sessions'] loop
        if not exists (
            select 1 from pg_policies
            where schemaname = 'public' and tablename = t and policyname = 'service_role full access'
        ) then
            execute format(
                'create policy %I on public.%I as permissive for all to service_role using (true) with check (true)',
                'service_role full access', t
            );
        end if;
    end loop;
end;
$$;

-- Privileges: Supabase's default privileges grant everything in public to anon and authenticated too; take those
-- back, and grant the usual set to service_role.
revoke all on table public.chats, public.chat_history, public.bot_flows, public.wa_sessions from anon, authenticated;
revoke all on sequence public.chat_history_id_seq, public.bot_flows_id_seq from anon, authenticated;
revoke all on function public.touch_updated_at() from public, anon, authenticated;
grant usage on schema public to service_role;
grant all on table public.chats, public.chat_history, public.bot_flows, public.wa_sessions to service_role;
grant usage, select on sequence public.chat_history_id_seq, public.bot_flows_id_seq to service_role;
